"""Shared fixtures: a real embedded PostgreSQL + pgvector server, one fresh database per test."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

from fantasia_assets.sample import SAMPLE_DIR

PROJECT = Path(__file__).resolve().parent.parent
SAMPLE = SAMPLE_DIR
SHARED_DATA = Path(os.environ.get("FANTASIA_SHARED_DATA", PROJECT.parent / "shared" / "data"))


def shared_file(name: str) -> Path:
    """A file of the shared real data set; the test is skipped (with the reason) when absent."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"shared real data not found: {path} (set FANTASIA_SHARED_DATA)")
    return path


@pytest.fixture(scope="session")
def fantasia_home():
    """A private $FANTASIA_HOME for the whole session (caches, default embedded server)."""
    home = Path(tempfile.mkdtemp(prefix="fa-home-"))
    previous = os.environ.get("FANTASIA_HOME")
    os.environ["FANTASIA_HOME"] = str(home)
    os.environ.pop("FANTASIA_DATABASE_URL", None)
    yield home
    if previous is None:
        os.environ.pop("FANTASIA_HOME", None)
    else:
        os.environ["FANTASIA_HOME"] = previous
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server(fantasia_home):
    """The embedded server of the session's $FANTASIA_HOME (started once), stopped at the end
    of the session before its home is removed: the library's own stop at the exit would find
    neither the data folder nor its list of users any more, and leave the server running."""
    from fantasia_assets.db.embedded import embedded_server, running_postmaster, stop_embedded

    server = embedded_server(fantasia_home / "pg")
    yield server
    stop_embedded(fantasia_home / "pg")
    if running_postmaster(fantasia_home / "pg") is not None:
        server.cleanup()


@pytest.fixture()
def database_url(pg_server, monkeypatch):
    """A fresh, empty database on the embedded server; FANTASIA_DATABASE_URL points at it."""
    from fantasia_assets.db.engine import dispose_engines, normalise_url

    base = normalise_url(pg_server.get_uri())
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name)
    monkeypatch.setenv("FANTASIA_DATABASE_URL", url.render_as_string(hide_password=False))
    yield url
    dispose_engines()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture()
def engine(database_url):
    """An engine on the fresh database, migrated to the current schema."""
    from fantasia_assets.db import get_engine, schema_ready

    engine = get_engine(database_url)
    schema_ready(engine)
    return engine


@pytest.fixture()
def sample_loaded(engine):
    """The bundled sample (both models) loaded into the fresh database."""
    from fantasia_assets.sample import load_sample

    load_sample(engine)
    return engine
