"""Reference database: models, engine (external URL or embedded server), migrations, loaders."""

from .engine import database_url, get_engine, redacted
from .migrate import schema_ready

__all__ = ["database_url", "get_engine", "redacted", "schema_ready"]
