"""The lineage table: rows appended with what made them, and tables of the previous version migrated."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb

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
