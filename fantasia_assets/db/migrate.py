"""Schema migrations (Alembic): bring a reference database to this version's schema.

`schema_ready(engine)` is what every user of the database calls first: the first call in a
process reads the database's revision and, when it is behind, upgrades it; later calls on the
same engine return at once (no query), so sensors and assets may call it freely. Upgrades hold
a transaction-scoped advisory lock and run in that one transaction: processes starting together
wait for each other, the second finds the work done, and a failed upgrade leaves the database
as it was.

A database without our revision table but with the shared tables is one made before
migrations existed (or a FANTASIA database): it is stamped at the baseline revision, whose DDL
is that of the earlier version, then upgraded. The revisions after the baseline converge from
either shape without removing a row.
"""

from __future__ import annotations

import functools
import threading
import weakref
from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy.engine import Connection, Engine

from .engine import DatabaseError, translate_errors
from .models import SHARED_TABLES, Base

MIGRATIONS_DIR = Path(__file__).resolve().with_name("migrations")
VERSION_TABLE = "fantasia_assets_alembic_version"
BASELINE = "0001"
SCHEMA_LOCK = "fantasia_assets.schema"

_ready: weakref.WeakSet[Engine] = weakref.WeakSet()
_ready_lock = threading.Lock()


def include_name(name: str | None, type_: str, parent_names) -> bool:
    """Only our tables are compared or migrated; PIS's other tables are left alone."""
    return name in SHARED_TABLES if type_ == "table" else True


def _config(connection: Connection | None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


@functools.cache
def _script() -> ScriptDirectory:
    return ScriptDirectory.from_config(_config(None))


def head_revision() -> str:
    """The revision this version of the code expects."""
    return _script().get_current_head()


def current_revision(connection: Connection) -> str | None:
    """The database's revision; None when it has never been migrated."""
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return context.get_current_revision()


def known(revision: str | None) -> bool:
    if revision is None:
        return True
    try:
        return _script().get_revision(revision) is not None
    except CommandError:  # "Can't locate revision"
        return False


def _unknown_revision(revision: str) -> DatabaseError:
    return DatabaseError(
        f"the reference database's schema is at revision {revision}, which this fantasia-assets "
        f"does not know (its newest is {head_revision()}): it was upgraded by a newer version; "
        "upgrade fantasia-assets"
    )


@translate_errors
def upgrade(engine: Engine) -> tuple[str | None, str]:
    """Apply every pending revision, under the schema lock; (revision before, revision after)."""
    with engine.begin() as conn:
        conn.execute(sa.text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": SCHEMA_LOCK})
        before = current_revision(conn)
        if not known(before):
            raise _unknown_revision(before)
        config = _config(conn)
        try:
            if before is None and sa.inspect(conn).has_table("sequence_embeddings"):
                command.stamp(config, BASELINE)
            command.upgrade(config, "head")
        except sa.exc.ProgrammingError as exc:
            raise DatabaseError(
                f"the reference database's schema is at revision {before or 'none'} and this "
                f"version needs {head_revision()}, but upgrading it failed: {_upgrade_failure(engine, exc)}"
            ) from exc
        after = current_revision(conn)
    return before, after


def _upgrade_failure(engine: Engine, exc: sa.exc.ProgrammingError) -> str:
    """Why an upgrade failed, with what to do about it when the cause is known."""
    reason = " ".join(str(exc.orig).split())
    state = getattr(exc.orig, "sqlstate", None)
    if "extension" in reason and "vector" in reason and state == "42501":  # insufficient_privilege
        return (
            f"{reason}; a superuser must run `CREATE EXTENSION vector;` in this database once "
            "(pgvector), then run the command again"
        )
    if state == "42501":
        # a role that may read but not alter the tables (a shared, restored dump, say)
        return f"{reason}; run `fantasia-assets db upgrade` as a role that owns the tables"
    if state == "42704" and ("vector" in reason or "halfvec" in reason):  # undefined_object
        return (
            f"{reason}; pgvector's types must be visible on the search_path: install the "
            "extension in a schema on it (`CREATE EXTENSION vector;`, or `ALTER EXTENSION vector "
            "SET SCHEMA public;`)"
        )
    if state == "42P07":  # duplicate_table: some of the shared tables exist, not all
        with engine.connect() as other:  # this transaction is aborted: look from another one
            inspector = sa.inspect(other)
            present = [name for name in sorted(SHARED_TABLES) if inspector.has_table(name)]
        missing = [name for name in sorted(SHARED_TABLES) if name not in present]
        return (
            f"{reason}; the database holds some of the reference tables but not all (missing: "
            f"{', '.join(missing) or 'none'}): it is neither empty nor a complete FANTASIA (PIS "
            "3.1.2) database; point FANTASIA_DATABASE_URL at an empty database or a complete one"
        )
    return reason


@translate_errors
def schema_ready(engine: Engine) -> None:
    """Make sure the database behind `engine` has the current schema; once per engine."""
    if engine in _ready:
        return
    with _ready_lock:
        if engine in _ready:
            return
        with engine.connect() as conn:
            current = current_revision(conn)
        if current != head_revision():
            upgrade(engine)
        _ready.add(engine)


@translate_errors
def revision(engine: Engine) -> str | None:
    """The database's revision (`current_revision`), on a connection of its own."""
    with engine.connect() as conn:
        return current_revision(conn)


@translate_errors
def check(engine: Engine) -> list[str]:
    """What differs between the database and the models: [] when the schema is current."""
    problems = []
    with engine.connect() as conn:
        current = current_revision(conn)
        if current != head_revision():
            if not known(current):
                raise _unknown_revision(current)
            problems.append(
                f"revision {current or 'none'} is behind {head_revision()}: run `fantasia-assets db upgrade`"
            )
        context = MigrationContext.configure(
            conn,
            opts={
                "version_table": VERSION_TABLE,
                "include_name": include_name,
                "compare_type": True,
                "compare_server_default": True,
                "target_metadata": Base.metadata,
            },
        )
        problems.extend(_describe(diff) for diff in compare_metadata(context, Base.metadata))
        problems.extend(_missing_serials(conn))
    return problems


def _missing_serials(conn: Connection) -> list[str]:
    """Serial ids the models declare but the database lacks (autogenerate does not compare them)."""
    missing = []
    for table in Base.metadata.sorted_tables:
        column = table.autoincrement_column
        if column is None or not sa.inspect(conn).has_table(table.name):
            continue
        default = conn.execute(
            sa.text(
                "SELECT column_default FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = :table AND column_name = :column"
            ),
            {"table": table.name, "column": column.name},
        ).scalar()
        if not (default or "").startswith("nextval("):
            missing.append(f"{table.name}.{column.name}: not a serial in the database (the models number it)")
    return missing


def _describe(diff) -> str:
    """One line per autogenerate difference (a tuple, or a list of column modifications)."""
    if isinstance(diff, list):
        return "; ".join(_describe(item) for item in diff)
    kind, *rest = diff
    if kind.startswith("modify_"):
        _schema, table, column, _info, database, models = rest
        what = kind.removeprefix("modify_")
        return f"{table}.{column}: {what} is {database!r} in the database, {models!r} in the models"
    action, _, thing = kind.partition("_")
    where = "missing from the database" if action == "add" else "in the database but not in the models"
    if thing == "column":
        _schema, table, column = rest
        return f"column {table}.{column.name} is {where}"
    subject = rest[0]
    table = getattr(getattr(subject, "table", None), "name", None)
    name = getattr(subject, "name", None) or str(subject)
    return f"{thing} {name}{f' on {table}' if table else ''} is {where}"
