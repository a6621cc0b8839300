"""Connecting to the reference database: `FANTASIA_DATABASE_URL`, or the embedded server.

`FANTASIA_DATABASE_URL` (any PostgreSQL with pgvector) wins when set; otherwise the embedded
server under `$FANTASIA_HOME/pg` is started or joined and its database `fantasia` is used.
URLs are always driven by psycopg 3 (`postgresql+psycopg://`), whatever driver they name,
because loading and fetching rely on its COPY support. Passwords never leave this module in
clear: use `redacted(url)` for anything shown to people (it masks the user-info password and a
`password=` query parameter alike), and errors about a malformed URL never quote it.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

from fantasia_assets.errors import FantasiaError

from .embedded import embedded_server

ENV_URL = "FANTASIA_DATABASE_URL"
EMBEDDED_DATABASE = "fantasia"
_CREATE_LOCK = "fantasia_assets.create_database"

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


class DatabaseError(FantasiaError, RuntimeError):
    """The reference database cannot be reached or is not usable."""


# A database that is down, or goes away mid-run: SQLAlchemy wraps what goes through it; the
# binary COPY and raw cursors (db.reads, db.loader) raise psycopg's own errors.
DRIVER_ERRORS = (
    sa.exc.OperationalError,
    sa.exc.InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
)

_P = ParamSpec("_P")
_R = TypeVar("_R")


def translate_errors(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Raise the driver errors of `function` as `DatabaseError`, with one clear line.

    Every public entry point of `db/` that talks to the server carries it, so that callers
    (the CLI, the Dagster sensor) catch `FantasiaError` only.
    """

    @functools.wraps(function)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return function(*args, **kwargs)
        except DRIVER_ERRORS as error:
            raise DatabaseError(database_message(error)) from error
        except (sa.exc.ProgrammingError, psycopg.ProgrammingError) as error:
            if not _refused_by_client(error):
                raise  # an SQL error: a defect of ours, with its traceback
            raise DatabaseError(_client_message(error)) from error

    return wrapper


def _driver_error(error: BaseException) -> BaseException:
    """The driver's own error under SQLAlchemy's wrapper, or `error` itself."""
    return error.orig if isinstance(error, sa.exc.DBAPIError) and error.orig is not None else error


def _refused_by_client(error: BaseException) -> bool:
    """A ProgrammingError the driver raised before any server answered (no SQLSTATE): a
    connection option it does not know (`?bogus=1`, `?schema=` of other tools), say."""
    driver_error = _driver_error(error)
    return (
        isinstance(driver_error, psycopg.ProgrammingError) and getattr(driver_error, "sqlstate", None) is None
    )


def _client_message(error: BaseException) -> str:
    driver_error = _driver_error(error)
    reason = " ".join(str(driver_error).split()) or type(driver_error).__name__
    database, _hint = _database_label()
    return (
        f"cannot connect to the reference database {database}: {reason} -- the driver (libpq) refused "
        f"the connection's options: correct the query string of {ENV_URL} (libpq's parameters only, "
        "such as sslmode or connect_timeout)"
    )


def _database_label() -> tuple[str, str]:
    """(the reference database as it may be shown, password masked; where to check it)."""
    from ..paths import fantasia_home

    configured = os.environ.get(ENV_URL)
    if not configured:
        pgdata = fantasia_home() / "pg"
        return (
            f"(embedded server under {pgdata})",
            f"the embedded server stopped; its log is {pgdata / 'log'}",
        )
    hint = f"check that the server {ENV_URL} names is running and that the URL is right"
    try:
        return redacted(normalise_url(configured)), hint
    except (DatabaseError, sa.exc.ArgumentError):  # unparsable: never echo what may hold a password
        return f"({ENV_URL})", hint


# SQLSTATEs of a server that is going away or not taking connections (the "08" class, connection
# exceptions, is matched by prefix); a failure without SQLSTATE happened in the client: no server.
_UNREACHABLE_STATES = {"57P01", "57P02", "57P03"}  # admin_shutdown, crash_shutdown, cannot_connect_now


def database_message(error: BaseException) -> str:
    """One line for a failed connection to the reference database or a failed query on it."""
    driver_error = _driver_error(error)
    reason = " ".join(str(driver_error).split()) or type(driver_error).__name__
    state = getattr(driver_error, "sqlstate", None)
    invalidated = isinstance(error, sa.exc.DBAPIError) and error.connection_invalidated
    database, hint = _database_label()
    if invalidated or state is None or state.startswith("08") or state in _UNREACHABLE_STATES:
        return (
            f"cannot reach the reference database {database}: {reason} -- {hint}, then run the "
            "command again (outputs are replaced whole, nothing needs cleaning up)"
        )
    return f"the reference database {database} failed: {reason}"


# libpq connection parameters that carry secrets when given in the URL's query string
_SECRET_QUERY_KEYS = frozenset({"password", "sslpassword"})


def _parse(url: str | URL) -> URL:
    """`make_url`, with errors that never repeat the URL (it may hold a password)."""
    if isinstance(url, URL):
        return url
    try:
        return make_url(url)
    except (ValueError, sa.exc.ArgumentError):
        # both messages may quote the string (SQLAlchemy's, or int() on a port such as "p@ss")
        raise DatabaseError(
            f"{ENV_URL} is not a valid database URL; expected "
            "postgresql://USER:PASSWORD@HOST:PORT/DATABASE (percent-encode special characters "
            "such as @ : / in the password)"
        ) from None


def normalise_url(url: str | URL) -> URL:
    """Force the psycopg 3 driver on a PostgreSQL URL."""
    parsed = _parse(url)
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise DatabaseError(
            f"{ENV_URL} must be a PostgreSQL URL (postgresql://…), got backend {parsed.get_backend_name()!r}"
        )
    if parsed.host and "@" in parsed.host:
        # an unescaped '@' in the password: the rest of the password would be taken for the host
        # (and shown unmasked wherever the URL is printed)
        raise DatabaseError(f"{ENV_URL}: the password holds an unescaped '@'; percent-encode it as %40")
    return parsed.set(drivername="postgresql+psycopg")


def redacted(url: str | URL) -> str:
    """The URL as it may be printed or logged: password masked, in user info and query alike."""
    try:
        parsed = _parse(url)
    except DatabaseError:
        return "<unparseable database URL>"
    secret = [key for key in parsed.query if key.lower() in _SECRET_QUERY_KEYS]
    text = parsed.difference_update_query(secret).render_as_string(hide_password=True)
    masked = "&".join(f"{key}=***" for key in secret)
    return text + ("&" if "?" in text else "?") + masked if secret else text


@translate_errors
def embedded_url(database: str = EMBEDDED_DATABASE) -> URL:
    """URL of `database` on the embedded server, created on first use."""
    server = embedded_server()
    base = normalise_url(server.get_uri())
    admin = sa.create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            # commands started together on a fresh home would both see no database and both
            # create it (the loser failing on pg_database's unique name): one at a time
            conn.execute(sa.text("SELECT pg_advisory_lock(hashtext(:key))"), {"key": _CREATE_LOCK})
            try:
                exists = conn.execute(
                    sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": database}
                ).scalar()
                if not exists:
                    conn.execute(sa.text(f'CREATE DATABASE "{_identifier(database)}"'))
            finally:
                conn.execute(sa.text("SELECT pg_advisory_unlock(hashtext(:key))"), {"key": _CREATE_LOCK})
    finally:
        admin.dispose()
    return base.set(database=database)


def _identifier(name: str) -> str:
    """Validate a database name used as an identifier (identifiers cannot be bound)."""
    if not name or not all(c.isalnum() or c == "_" for c in name):
        raise DatabaseError(f"invalid database name {name!r}: use letters, digits and '_'")
    return name


def database_url() -> URL:
    """The reference database URL from the environment, or the embedded default."""
    env = os.environ.get(ENV_URL)
    if env:
        return normalise_url(env)
    return embedded_url()


def get_engine(url: str | URL | None = None) -> Engine:
    """A pooled engine for `url` (default: `database_url()`), shared within the process."""
    resolved = normalise_url(url) if url is not None else database_url()
    key = resolved.render_as_string(hide_password=False)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None:
            # a password given as a query parameter goes to the driver, not into engine.url,
            # whose repr (SQLAlchemy masks only the user-info password) ends up in logs
            secret = {k: v for k, v in resolved.query.items() if k.lower() in _SECRET_QUERY_KEYS}
            secret = {k: v[-1] if isinstance(v, tuple) else v for k, v in secret.items()}
            engine = sa.create_engine(
                resolved.difference_update_query(list(secret)), pool_pre_ping=True, connect_args=secret
            )
            _engines[key] = engine
    return engine


def dispose_engines() -> None:
    """Close every pooled connection (tests, forked workers)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
