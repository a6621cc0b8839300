"""Connecting to the reference database: `FANTASIA_DATABASE_URL`, or the embedded server.

`FANTASIA_DATABASE_URL` (any PostgreSQL with pgvector) wins when set; otherwise the embedded
server under `$FANTASIA_HOME/pg` is started or joined and its database `fantasia` is used.
URLs are always driven by psycopg 3 (`postgresql+psycopg://`), whatever driver they name,
because loading and fetching rely on its COPY support. Passwords never leave this module in
clear: use `redacted(url)` for anything shown to people.
"""

from __future__ import annotations

import os
import threading

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

from .embedded import embedded_server

ENV_URL = "FANTASIA_DATABASE_URL"
EMBEDDED_DATABASE = "fantasia"

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


class DatabaseError(RuntimeError):
    """The reference database cannot be reached or is not usable."""


def normalise_url(url: str | URL) -> URL:
    """Force the psycopg 3 driver on a PostgreSQL URL."""
    parsed = make_url(url) if isinstance(url, str) else url
    if parsed.get_backend_name() not in ("postgresql", "postgres"):
        raise DatabaseError(
            f"{ENV_URL} must be a PostgreSQL URL (postgresql://…), got backend {parsed.get_backend_name()!r}"
        )
    return parsed.set(drivername="postgresql+psycopg")


def redacted(url: str | URL) -> str:
    """The URL as it may be printed or logged: password masked."""
    parsed = make_url(url) if isinstance(url, str) else url
    return parsed.render_as_string(hide_password=True)


def embedded_url(database: str = EMBEDDED_DATABASE) -> URL:
    """URL of `database` on the embedded server, created on first use."""
    server = embedded_server()
    base = normalise_url(server.get_uri())
    admin = sa.create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            exists = conn.execute(
                sa.text("SELECT 1 FROM pg_database WHERE datname = :name"), {"name": database}
            ).scalar()
            if not exists:
                conn.execute(sa.text(f'CREATE DATABASE "{_identifier(database)}"'))
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
            engine = sa.create_engine(resolved, pool_pre_ping=True)
            _engines[key] = engine
    return engine


def dispose_engines() -> None:
    """Close every pooled connection (tests, forked workers)."""
    with _engines_lock:
        for engine in _engines.values():
            engine.dispose()
        _engines.clear()
