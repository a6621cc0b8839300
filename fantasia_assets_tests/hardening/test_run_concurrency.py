"""Commands that run at the same time: a fresh home, one experiment_path, a load during a lookup.

The fresh-home case starts real `fantasia-assets` subprocesses on an empty `FANTASIA_HOME`
(its own embedded server); the others use the session's server and real threads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from fantasia_assets_tests.conftest import PROJECT

TIMEOUT = 240  # seconds for a first start (initdb) on a loaded machine


def _cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FANTASIA_DATABASE_URL"}
    env["FANTASIA_HOME"] = str(home)
    env["PYTHONPATH"] = str(PROJECT)
    return env


def test_two_commands_at_once_on_a_fresh_home__both_succeed_on_one_server(tmp_path):
    env = _cli_env(tmp_path / "home")
    command = [sys.executable, "-m", "fantasia_assets.cli", "db", "current"]
    runs = [
        subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    results = [run.communicate(timeout=TIMEOUT) + (run.returncode,) for run in runs]
    for out, err, code in results:
        assert code == 0, err
        assert "Traceback" not in err and "IntegrityError" not in err
        assert "revision:" in out
