"""Idempotent creation of the reference schema and the pgvector extension."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from .engine import translate_errors
from .models import Base


@translate_errors
def ensure_schema(engine: Engine) -> None:
    """Create `vector` and every missing table and index; existing ones are left as they are.

    Safe to run concurrently from several processes: an advisory lock serialises creation.
    """
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext('fantasia_assets.schema'))"))
        conn.execute(sa.text("CREATE EXTENSION IF NOT EXISTS vector"))
        Base.metadata.create_all(conn)
