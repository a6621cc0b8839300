"""The lineage table: rows appended with what made them, and tables of the previous version migrated."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from fantasia_assets.core import lineage

# the table as the previous version created it, before code_version and origin
PREVIOUS_SCHEMA = """
CREATE TABLE lineage (
    run_id VARCHAR, asset VARCHAR, partition VARCHAR, reference_version VARCHAR,
    query_version VARCHAR, config_hash VARCHAR, row_counts JSON, timings JSON,
    materialized_at TIMESTAMP
)
"""


def _row(run_id: str, partition: str | None) -> lineage.LineageRow:
    return lineage.LineageRow(
        run_id, "raw_result_shards", partition, "fp-ann", "queries", "config", {"rows": 7}, {"search": 0.123456},
        origin="cli",
    )  # fmt: skip


def test_rows_record_what_made_them(tmp_path: Path) -> None:
    path = tmp_path / "lineage.duckdb"
    lineage.record(path, [_row("r1", "NEAR|layer_0"), _row("r1", "NEAR|layer_1")])
    with duckdb.connect(str(path), read_only=True) as conn:
        rows = conn.execute(
            "SELECT run_id, partition, reference_version, query_version, config_hash, row_counts, "
            "timings, code_version, origin FROM lineage ORDER BY partition"
        ).fetchall()
    assert [r[1] for r in rows] == ["NEAR|layer_0", "NEAR|layer_1"]
    run_id, _, reference, query, config, counts, timings, code, origin = rows[0]
    assert (run_id, reference, query, config, origin) == ("r1", "fp-ann", "queries", "config", "cli")
    assert json.loads(counts) == {"rows": 7} and json.loads(timings) == {"search": 0.1235}
    assert code == lineage.CODE_VERSION


def test_table_of_the_previous_version_gains_columns_and_keeps_rows(tmp_path: Path) -> None:
    path = tmp_path / "lineage.duckdb"
    with duckdb.connect(str(path)) as conn:
        conn.execute(PREVIOUS_SCHEMA)
        conn.execute(
            "INSERT INTO lineage VALUES ('old', 'neighbour_hits', 'NEAR|layer_0', 'v', 'q', 'c', "
            "'{\"queries\": 3}', '{}', TIMESTAMP '2026-11-01 10:00:00')"
        )
    lineage.record(path, [_row("new", "NEAR|layer_0")])
    lineage.record(path, [_row("newer", None)])  # a migrated table migrates again as a no-op
    with duckdb.connect(str(path), read_only=True) as conn:
        names = [c[0] for c in conn.execute("DESCRIBE lineage").fetchall()]
        rows = conn.execute(
            "SELECT run_id, asset, row_counts, code_version, origin FROM lineage ORDER BY materialized_at, run_id"
        ).fetchall()
    assert names == [name for name, _ in lineage.COLUMNS]
    assert rows[0] == ("old", "neighbour_hits", '{"queries": 3}', None, None)
    assert [r[0] for r in rows] == ["old", "new", "newer"]


def test_the_record_needs_duckdbs_engine_only(tmp_path: Path) -> None:
    """`record` writes through `_duckdb`, the extension the `duckdb` package re-exports, without
    importing the package; the table is the package's to read."""
    import subprocess
    import sys

    from fantasia_assets_tests.conftest import PROJECT

    path = tmp_path / "lineage.duckdb"
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from fantasia_assets.core import lineage\n"
        f"lineage.record(Path({str(path)!r}), [lineage.LineageRow('r1', 'a', None, 'v', 'q', 'c')])\n"
        "print('duckdb' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False"]
    assert lineage.engine().connect is duckdb.connect and lineage.engine().IOException is duckdb.IOException
    with duckdb.connect(str(path), read_only=True) as conn:
        assert conn.execute("SELECT run_id, asset, origin FROM lineage").fetchall() == [
            ("r1", "a", "dagster")
        ]


def _hold(path: Path, seconds: float):
    """A child process that holds `path` open for writing for `seconds` (DuckDB's file lock)."""
    import subprocess
    import sys

    code = (
        "import sys, time, duckdb\n"
        f"conn = duckdb.connect({str(path)!r})\n"
        "print('held', flush=True)\n"
        f"time.sleep({seconds})\n"
        "conn.close()\n"
    )
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_a_file_busy_in_another_process_is_written_once_it_is_free(tmp_path: Path) -> None:
    path = tmp_path / "lineage.duckdb"
    lineage.record(path, [_row("r0", None)])
    child = _hold(path, 1.0)
    try:
        lineage.record(path, [_row("r1", "NEAR|layer_0"), _row("r1", "NEAR|layer_1")])
    finally:
        child.wait(timeout=60)
    with duckdb.connect(str(path), read_only=True) as conn:
        assert conn.execute("SELECT run_id FROM lineage ORDER BY run_id, partition").fetchall() == [
            ("r0",),
            ("r1",),
            ("r1",),
        ]


def test_the_file_is_free_for_other_processes_after_each_record_even_a_failed_one(tmp_path: Path) -> None:
    path = tmp_path / "lineage.duckdb"
    lineage.record(path, [_row("r1", None)])
    _hold(path, 0).wait(timeout=60)  # opened for writing at once: this process holds no lock
    broken = tmp_path / "broken.duckdb"
    with duckdb.connect(str(broken)) as conn:  # a column that refuses what record writes
        conn.execute("CREATE TABLE lineage (run_id INTEGER)")
    with pytest.raises(duckdb.Error):
        lineage.record(broken, [_row("not a number", None)])
    _hold(broken, 0).wait(timeout=60)
    with duckdb.connect(str(broken), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM lineage").fetchall() == [(0,)]  # one transaction
    lineage.record(path, [_row("r2", None)])  # the process's instance still writes
    with duckdb.connect(str(path), read_only=True) as conn:
        assert conn.execute("SELECT run_id FROM lineage ORDER BY run_id").fetchall() == [("r1",), ("r2",)]


def test_warm_up_in_a_thread_then_record_in_a_fresh_process(tmp_path: Path) -> None:
    """What the CLI's lookup does: the instance made in the background, the record at the end."""
    import subprocess
    import sys

    from fantasia_assets_tests.conftest import PROJECT

    path = tmp_path / "lineage.duckdb"
    code = (
        "import threading\n"
        "from pathlib import Path\n"
        "from fantasia_assets.core import lineage\n"
        "threading.Thread(target=lineage.warm_up).start()\n"
        f"lineage.record(Path({str(path)!r}), [lineage.LineageRow('r1', 'a', None, 'v', 'q', 'c')])\n"
        "print(len(lineage._instances))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1"]  # one instance, whichever thread made it
    with duckdb.connect(str(path), read_only=True) as conn:
        assert conn.execute("SELECT run_id FROM lineage").fetchall() == [("r1",)]
