"""Connecting to the reference database: `FANTASIA_DATABASE_URL`, or the embedded server.

`FANTASIA_DATABASE_URL` (any PostgreSQL with pgvector) wins when set; otherwise the embedded
server under `$FANTASIA_HOME/pg` is started or joined and its database `fantasia` is used.
URLs are always driven by psycopg 3 (`postgresql+psycopg://`), whatever driver they name,
because loading and fetching rely on its COPY support. Passwords never leave this module in
clear: use `redacted(url)` for anything shown to people (it masks the user-info password and a
`password=` query parameter alike), and errors about a malformed URL never quote it.
"""

from __future__ import annotations

import os
import threading

import sqlalchemy as sa
from sqlalchemy.engine import URL, Engine, make_url

from fantasia_assets.errors import FantasiaError

from .embedded import embedded_server

ENV_URL = "FANTASIA_DATABASE_URL"
EMBEDDED_DATABASE = "fantasia"

_engines: dict[str, Engine] = {}
_engines_lock = threading.Lock()


class DatabaseError(FantasiaError, RuntimeError):
    """The reference database cannot be reached or is not usable."""


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
