"""Fixtures of the database tests: extra fresh databases on the session's embedded server."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa


@pytest.fixture()
def make_database(pg_server):
    """A factory of fresh, empty databases (URL, psycopg 3 driver); all dropped afterwards."""
    from fantasia_assets.db.engine import dispose_engines, normalise_url

    base = normalise_url(pg_server.get_uri())
    admin = sa.create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    names: list[str] = []

    def make():
        name = f"t_{uuid.uuid4().hex[:12]}"
        with admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        names.append(name)
        return base.set(database=name)

    yield make
    dispose_engines()
    with admin.connect() as conn:
        for name in names:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
