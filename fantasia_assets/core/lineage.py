"""The lineage table (`lineage.duckdb`): one row per materialised asset or partition and what made it.

Both the Dagster assets (through the `lineage` resource) and the CLI's `lookup` append here:
which run, which asset and partition, from which references (embedding rows and annotations
fingerprint), which query file (content hash), which configuration (hash), which code, how
many rows, and how long each stage took. A table written by an earlier version gains the
new columns on the next write (null in the old rows); no row is lost.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from fantasia_assets import __version__

TABLE = "lineage"
# (name, type) in table order; columns after `materialized_at` were added later and are
# migrated into older tables by ALTER TABLE.
COLUMNS = (
    ("run_id", "VARCHAR"),
    ("asset", "VARCHAR"),
    ("partition", "VARCHAR"),
    ("reference_version", "VARCHAR"),
    ("query_version", "VARCHAR"),
    ("config_hash", "VARCHAR"),
    ("row_counts", "JSON"),
    ("timings", "JSON"),
    ("materialized_at", "TIMESTAMP"),
    ("code_version", "VARCHAR"),
    ("origin", "VARCHAR"),
)
CODE_VERSION = f"fantasia-assets {__version__}"


@dataclass(frozen=True)
class LineageRow:
    """One materialisation. `reference_version` is `{embedding fingerprint}-{annotation version}`
    for a partition, the annotation version for run-wide assets; `origin` is "dagster" or "cli"."""

    run_id: str
    asset: str
    partition: str | None
    reference_version: str | None
    query_version: str | None
    config_hash: str
    row_counts: Mapping[str, int] = field(default_factory=dict)
    timings: Mapping[str, float] = field(default_factory=dict)
    code_version: str = CODE_VERSION
    origin: str = "dagster"


def new_run_id() -> str:
    """A run id for runs outside Dagster (the CLI), shaped like Dagster's (a UUID)."""
    return str(uuid.uuid4())


def record(path: Path, rows: Sequence[LineageRow], attempts: int = 60) -> None:
    """Append `rows` to the table at `path`, creating or migrating it first.

    DuckDB admits one writing process per file: a file busy in another process (two partitions
    finishing at once) is retried for about `attempts` × 0.25 s. The file is attached to this
    process's in-memory DuckDB (`warm_up`) for the write and detached after: making a DuckDB
    instance costs ≈ 35 ms (its catalog of built-in functions), attaching a file to one ≈ 25 ms
    with the write, and a small lookup pays this at its very end. The rows go in as one transaction.
    """
    duckdb = engine()
    path.parent.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC).replace(tzinfo=None)
    values = [
        [
            row.run_id, row.asset, row.partition, row.reference_version, row.query_version,
            row.config_hash, json.dumps(dict(row.row_counts)),
            json.dumps({stage: round(seconds, 4) for stage, seconds in row.timings.items()}),
            now, row.code_version, row.origin,
        ]
        for row in rows
    ]  # fmt: skip
    names = ", ".join(name for name, _ in COLUMNS)
    marks = ", ".join("?" for _ in COLUMNS)
    for attempt in range(attempts):
        with _instance_lock:
            memory = _instance()
            try:
                memory.execute(f"ATTACH ? AS {_ATTACHED}", [str(path)])
            except duckdb.IOException:
                if attempt == attempts - 1:
                    raise
            else:
                try:
                    memory.execute(f"USE {_ATTACHED}")
                    migrate(memory)
                    memory.execute("BEGIN TRANSACTION")
                    memory.executemany(f"INSERT INTO {TABLE} ({names}) VALUES ({marks})", values)
                    memory.execute("COMMIT")
                finally:
                    _detach(memory)
                return
        time.sleep(0.25 + 0.05 * (os.getpid() % 5))


_ATTACHED = "lineage_file"  # the lineage file's name inside the in-memory instance
_instance_lock = threading.Lock()  # one record at a time per process; `warm_up` in a thread
_instances: dict[int, object] = {}  # process id -> the in-memory DuckDB connection


def warm_up() -> None:
    """Make this process's in-memory DuckDB now, for `record` to attach files to later: a lookup
    calls it in a thread while it works, so that its last step does not wait ≈ 35 ms for it."""
    with _instance_lock:
        _instance()


def _instance():
    """This process's in-memory DuckDB, made at the first call (with `_instance_lock` held). Keyed
    by process id: a forked child makes its own rather than use a copy of its parent's."""
    if os.getpid() not in _instances:
        _instances.clear()
        _instances[os.getpid()] = engine().connect(":memory:", config={"threads": 1})
    return _instances[os.getpid()]


def _detach(memory) -> None:
    """Detach the lineage file (its lock released), whatever state the write left; an instance
    that cannot is dropped, and the next record makes another."""
    try:
        with contextlib.suppress(engine().TransactionException):
            memory.execute("ROLLBACK")  # nothing left open after a COMMIT: refused, harmless
        memory.execute("USE memory")
        memory.execute(f"DETACH {_ATTACHED}")
    except engine().Error:
        _instances.clear()
        with contextlib.suppress(engine().Error):
            memory.close()


def engine():
    """DuckDB's engine: `_duckdb`, the extension module the `duckdb` package re-exports (its
    `connect` and exceptions are the same objects), without the package's own Python layer (the
    relational API, expressions, sources): that layer is ≈ 40 ms of CPU of a small lookup's
    imports, for the three statements written here. The package where the extension is not
    importable under that name."""
    try:
        import _duckdb
    except ImportError:
        import duckdb

        return duckdb
    return _duckdb


def migrate(conn) -> None:
    """Create the table, or add the columns a table of an earlier version lacks (rows kept).

    Only the missing columns are altered: each ALTER is a transaction of its own, and eleven of
    them cost a small lookup as much as the rest of its lineage write."""
    first = ", ".join(f"{name} {kind}" for name, kind in COLUMNS)
    conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} ({first})")
    present = {row[0] for row in conn.execute(f"DESCRIBE {TABLE}").fetchall()}
    for name, kind in COLUMNS:
        if name not in present:
            conn.execute(f"ALTER TABLE {TABLE} ADD COLUMN {name} {kind}")
