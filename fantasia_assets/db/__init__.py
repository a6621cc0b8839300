"""Reference database: models, engine (external URL or embedded server), migrations, loaders.

The names below are loaded on first use, so that a module of this package that needs no SQL
(`db.snapshot`, `db.stores`) is imported without SQLAlchemy, psycopg and Alembic.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "database_url": ".engine",
    "get_engine": ".engine",
    "redacted": ".engine",
    "schema_ready": ".migrate",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
