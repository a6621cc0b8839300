"""The embedded server shared between processes, and FANTASIA_DATABASE_URL to another server."""

from __future__ import annotations

import json
import subprocess
import sys

import sqlalchemy as sa

from fantasia_assets.cli import main
from fantasia_assets.db.embedded import embedded_server
from fantasia_assets.db.engine import dispose_engines, normalise_url, redacted


def test_second_process_reuses_the_running_server(pg_server):
    pgdata = pg_server.pgdata
    code = (
        "from pathlib import Path; from fantasia_assets.db.embedded import embedded_server; "
        f"s = embedded_server(Path({str(pgdata)!r})); print(s.get_pid())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) == pg_server.get_pid()
    # the child's exit does not stop a server this process still uses
    engine = sa.create_engine(normalise_url(pg_server.get_uri()))
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT 1")).scalar() == 1
    engine.dispose()


def test_dead_process_handles_are_pruned(pg_server):
    handles = pg_server.pgdata / ".handle_pids.json"
    pids = json.loads(handles.read_text())
    handles.write_text(json.dumps([*pids, 2**22 + 12345]))  # no such process
    embedded_server(pg_server.pgdata)
    assert 2**22 + 12345 not in json.loads(handles.read_text())


def test_database_url_points_at_another_server(pg_server, tmp_path, monkeypatch, capsys):
    other = embedded_server(tmp_path / "pg2")
    try:
        url = normalise_url(other.get_uri()).set(database="postgres")
        monkeypatch.setenv("FANTASIA_DATABASE_URL", url.render_as_string(hide_password=False))
        sample = __import__("fantasia_assets_tests.conftest", fromlist=["SAMPLE"]).SAMPLE
        code = main(
            [
                "load-references",
                "--fasta", str(sample / "references.fasta.gz"),
                "--gaf", str(sample / "references.gaf.gz"),
                "--obo", str(sample / "go-basic.obo.gz"),
                "--embeddings", str(sample / "references_near.h5"),
                "--model", "NEAR",
            ]
        )  # fmt: skip
        assert code == 0
        printed = capsys.readouterr().out
        assert f"reference database: {redacted(url)}" in printed
        assert "embeddings:   NEAR (type_1) layer_0: 300 new" in printed
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM sequence_embeddings")).scalar() == 900
        engine.dispose()
        # the default embedded server was not touched
        default = sa.create_engine(normalise_url(pg_server.get_uri()).set(database="postgres"))
        with default.connect() as conn:
            assert not conn.execute(sa.text("SELECT to_regclass('sequence_embeddings')")).scalar()
        default.dispose()
    finally:
        dispose_engines()
        other.cleanup()


def _run(code: str, pgdata) -> subprocess.CompletedProcess:
    prelude = (
        "import sqlalchemy as sa; from pathlib import Path; "
        "from fantasia_assets.db.embedded import embedded_server; "
        "from fantasia_assets.db.engine import normalise_url; "
        f"server = embedded_server(Path({str(pgdata)!r})); "
        "engine = sa.create_engine(normalise_url(server.get_uri()), isolation_level='AUTOCOMMIT'); "
    )
    return subprocess.run([sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=120)


def test_server_survives_stops_and_killed_users(tmp_path):
    """The last process to leave stops the server cleanly; a SIGKILLed user corrupts nothing."""
    import signal
    import time

    pgdata = tmp_path / "pg"
    created = _run(
        "engine.connect().execute(sa.text('CREATE TABLE kept (x int)')); print(server.get_pid())", pgdata
    )
    assert created.returncode == 0, created.stderr
    first_pid = int(created.stdout.split()[-1])
    assert not (pgdata / "postmaster.pid").exists()  # stopped when its only user exited
    # a user killed with SIGKILL while connected: the server keeps running, data intact
    victim = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time, sqlalchemy as sa; from pathlib import Path; "
            "from fantasia_assets.db.embedded import embedded_server; "
            "from fantasia_assets.db.engine import normalise_url; "
            f"s = embedded_server(Path({str(pgdata)!r})); "
            "c = sa.create_engine(normalise_url(s.get_uri())).connect(); "
            "c.execute(sa.text('BEGIN')); c.execute(sa.text('INSERT INTO kept VALUES (1)')); "
            "print('ready', flush=True); time.sleep(60)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert victim.stdout.readline().strip() == "ready"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    time.sleep(0.5)
    after = _run(
        "print(server.get_pid(), engine.connect().execute(sa.text('SELECT count(*) FROM kept')).scalar())",
        pgdata,
    )
    assert after.returncode == 0, after.stderr
    pid, rows = map(int, after.stdout.split()[-2:])
    assert rows == 0  # the killed user's open transaction was rolled back
    assert pid != first_pid
    assert not (pgdata / "postmaster.pid").exists()  # dead handle pruned: the last live user stopped it
