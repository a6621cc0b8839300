"""`fantasia-assets db stop`: the embedded server a killed command left running is stopped on
request, and one that a live process still uses is left running, with that process named."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from fantasia_assets.db.embedded import running_postmaster
from fantasia_assets_tests.conftest import PROJECT

# starts the embedded server (a command's first use of the database), then dies without its exit
_KILLED_USER = """
import os, signal
from fantasia_assets.db.embedded import embedded_server
embedded_server()
os.kill(os.getpid(), signal.SIGKILL)
"""
# starts or joins it, says so, and holds it until its standard input closes
_LIVE_USER = """
import sys
from fantasia_assets.db.embedded import embedded_server
embedded_server()
print("ready", flush=True)
sys.stdin.read()
"""


def _env(home) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "FANTASIA_DATABASE_URL"}
    env.update(FANTASIA_HOME=str(home), PYTHONPATH=str(PROJECT))
    return env


def _db_stop(home) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fantasia_assets.cli", "db", "stop"],
        env=_env(home), capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_command_killed_with_sigkill_then_db_stop__the_server_it_left_running_is_stopped(tmp_path):
    home = tmp_path / "home"
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_USER], env=_env(home), capture_output=True, text=True, timeout=240
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert running_postmaster(home / "pg") is not None  # left running by the killed command

    stopped = _db_stop(home)
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stdout.strip() == f"stopped the embedded server under {home / 'pg'}"
    assert running_postmaster(home / "pg") is None
    again = _db_stop(home)
    assert (again.returncode, again.stdout.strip()) == (
        0,
        f"the embedded server under {home / 'pg'} is not running",
    )


def test_db_stop_while_another_process_uses_the_server__exit_1_naming_it_and_the_server_keeps_running(
    tmp_path,
):
    home = tmp_path / "home"
    user = subprocess.Popen(
        [sys.executable, "-c", _LIVE_USER],
        env=_env(home),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert user.stdout.readline().strip() == "ready"
        refused = _db_stop(home)
        assert refused.returncode == 1, refused.stderr
        assert refused.stdout.startswith("left running: ") and f"process {user.pid} (" in refused.stdout
        assert running_postmaster(home / "pg") is not None
    finally:
        user.stdin.close()
        user.wait(timeout=120)
    assert running_postmaster(home / "pg") is None  # its last user's exit stopped it, as always


def test_db_stop_with_an_external_database_url__exit_2_and_nothing_is_stopped(tmp_path):
    env = _env(tmp_path / "home")
    env["FANTASIA_DATABASE_URL"] = "postgresql://someone@db.example.org/fantasia"
    run = subprocess.run(
        [sys.executable, "-m", "fantasia_assets.cli", "db", "stop"], env=env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stderr.startswith("error: FANTASIA_DATABASE_URL names an external database")
    assert not (tmp_path / "home").exists()


# joins the server, starts a second user of it, which is killed, then exits as the last live user
_OUTLIVES_A_KILLED_USER = """
import os, signal, subprocess, sys
from fantasia_assets.db.embedded import embedded_server
embedded_server()
killed = subprocess.run([sys.executable, "-c", sys.argv[1]])
assert killed.returncode == -signal.SIGKILL, killed.returncode
"""


def test_last_live_user_exits_after_another_user_was_killed__the_server_stops(tmp_path):
    home = tmp_path / "home"
    run = subprocess.run(
        [sys.executable, "-c", _OUTLIVES_A_KILLED_USER, _KILLED_USER],
        env=_env(home), capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    # the killed user's registration was left behind; the exit of the last live one still stops it
    assert running_postmaster(home / "pg") is None, "the server outlived every live user"
