"""A query's rows as a local file of COPY text, written by the server itself when it can be.

A client ``COPY … TO STDOUT`` hands the client every row as its own protocol message, and
psycopg passes each one through Python with the GIL held: 1.0-1.3 CPU-s for the 620,000
annotation rows of FANTASIA's reference set (measured), taken from the search workers that run
beside that read (their bookkeeping needs the GIL between products).

When the session is a superuser's over a Unix socket (the embedded server's is) and the
server's data directory is a local folder this process may read and write, the server writes
the file instead (``COPY … TO 'name'``, in its data directory): no row passes through Python.
A server that refuses to write there (a permission, a full disk) leaves the read to the client. The file's name carries
a random token, so finding it in the local folder proves the folder is the server's; if it is
not there (a socket shared with another file system), the server empties its copy and the
client COPY is used. Both ways run the same statement with the same options and an explicit
``ENCODING 'UTF8'``, so the bytes are the same; the file is removed when the caller is done.

Everything here is decided per call from the session (`_server_folder`); no setting is needed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import psycopg
from psycopg import sql
from sqlalchemy.engine import Engine

from ..paths import temporary_file

_PREFIX = "fantasia-copy-"


@contextlib.contextmanager
def copied(
    engine: Engine, query: sql.Composable, params: dict, options: str, suffix: str = ".csv"
) -> Iterator[Path]:
    """A file holding ``COPY (query) TO … (options, ENCODING 'UTF8')``'s output, while in the block.

    `options` is trusted text of ours ("FORMAT csv, HEADER"); values in `query` are bound
    (client-side, as psycopg binds COPY's).
    """
    options = f"{options}, ENCODING 'UTF8'"
    written = _server_copy(engine, query, params, options, suffix)
    if written is not None:
        try:
            yield written
        finally:
            written.unlink(missing_ok=True)
        return
    with temporary_file(suffix) as scratch:
        with engine.connect() as conn, open(scratch, "wb") as out:
            statement = sql.SQL("COPY ({}) TO STDOUT ({})").format(query, sql.SQL(options))
            with conn.connection.driver_connection.cursor().copy(statement, params) as copy:
                for block in copy:
                    out.write(block)
        yield scratch


def server_writes(engine: Engine) -> bool:
    """Whether `copied` would have the server write its files here (`_server_folder`): then no
    row passes through this process's interpreter. A server that refuses a write later still
    falls back to the client COPY."""
    with engine.connect() as conn:
        return _server_folder(conn.connection.driver_connection) is not None


def _server_copy(
    engine: Engine, query: sql.Composable, params: dict, options: str, suffix: str
) -> Path | None:
    """The local path of the file the server wrote, or None where it cannot write one here."""
    with engine.connect() as conn:
        connection = conn.connection.driver_connection
        folder = _server_folder(connection)
        if folder is None:
            return None
        name = f"{_PREFIX}{secrets.token_hex(16)}{suffix}"
        # through the server's own working directory, its data directory: COPY takes only an
        # absolute path, and the server's user may not reach the folders above its data
        # directory (a home closed to others, the server run as another user)
        target = sql.Literal(f"/proc/self/cwd/{name}")
        cursor = psycopg.ClientCursor(connection)
        try:
            cursor.execute(sql.SQL("COPY ({}) TO {} ({})").format(query, target, sql.SQL(options)), params)
        except psycopg.Error:
            if connection.closed:
                raise
            connection.rollback()  # the server may not write there after all: read as a client
            (folder / name).unlink(missing_ok=True)  # whatever a failure part-way left there
            return None
        if _visible(folder / name):
            return folder / name
        # not this host's folder after all: leave nothing behind there, then read as a client
        cursor.execute(sql.SQL("COPY (SELECT WHERE false) TO {}").format(target))
        return None


def _server_folder(connection: psycopg.Connection) -> Path | None:
    """The server's data directory when the server may write a file there that this process
    can read and remove: a superuser session over a Unix socket, the directory a local folder
    with read, write and search permission for us. None otherwise."""
    cursor = connection.cursor()
    cursor.execute(
        "SELECT inet_server_addr() IS NULL AND rolsuper FROM pg_roles WHERE rolname = current_user"
    )
    row = cursor.fetchone()
    if not row or not row[0]:
        return None
    cursor.execute("SELECT current_setting('data_directory')")
    folder = Path(cursor.fetchone()[0])
    if not folder.is_absolute() or not folder.is_dir():
        return None
    if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
        return None
    return folder


def _visible(path: Path) -> bool:
    """Whether the file the server wrote is here (the proof that its folder is this host's)."""
    return path.is_file()
