"""Reference database: models, engine (external URL or embedded server), schema, loaders."""

from .engine import database_url, get_engine, redacted
from .schema import ensure_schema

__all__ = ["database_url", "ensure_schema", "get_engine", "redacted"]
