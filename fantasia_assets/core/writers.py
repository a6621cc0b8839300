"""Writing and reading back the lookup's outputs (SPEC §4) under a root folder, each atomically.

`root` is experiment_path (the Dagster assets write there directly) or a run's staging folder
(the CLI's whole-run lookup, published at the end by `core.staging`).
"""

from __future__ import annotations

import os
import shutil
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from . import aggregate, aggregate_memory, compat, exports, incremental_fasta
from .layout import ENSEMBLE, FASTA, MAPPING, OUTPUT_NAMES, SKIPPED, SUMMARY, partition_paths
from .plan import LookupPlanError, Partition, QuerySet
from .stages import SearchOutcome
from .summary import SummarySpec, topgo_tables

# bumped when a written file's layout or number format changes (SPEC §4), whatever computed it
OUTPUT_FORMAT_VERSION = "outputs-1"

if TYPE_CHECKING:  # DuckDB is imported by `aggregate` where a run opens it
    import duckdb


def write_hits(root: Path, partition: Partition, outcome: SearchOutcome) -> dict[str, Path]:
    """The partition's neighbours, the queries that have none within the threshold, and the
    queries left out of it."""
    paths = partition_paths(root, partition)
    exports.write_parquet_atomic(paths["hits"], outcome.hits)
    exports.write_parquet_atomic(
        paths["no_hits"],
        pl.DataFrame({"accession": outcome.queries_without_hits}, schema={"accession": pl.String}),
    )
    exports.write_parquet_atomic(
        paths["skipped"],
        pl.DataFrame(outcome.skipped, schema={"group": pl.String, "reason": pl.String}, orient="row"),
    )
    return paths


def read_hits(root: Path, partition: Partition) -> pl.DataFrame:
    path = partition_paths(root, partition)["hits"]
    if not path.exists():
        raise LookupPlanError(f"{partition.key}: neighbour hits not computed yet ({path})")
    return pl.read_parquet(path)


def shard_file_names(queries: QuerySet, fantasia_compat: bool = False) -> dict[str, str]:
    """Accession → raw shard file name (FANTASIA's lower case in compat mode)."""
    return compat.shard_names(queries.shard_names) if fantasia_compat else queries.shard_names


def write_raw(
    root: Path,
    partition: Partition,
    raw: pl.DataFrame,
    shard_names: dict[str, str],
    precision: int,
    fantasia_compat: bool = False,
    published: Path | None = None,
) -> dict[str, Path]:
    """Raw rows (Parquet) and the raw CSV shards of one partition, each replaced whole."""
    paths = write_raw_rows(root, partition, raw)
    write_raw_csv(root, partition, raw, shard_names, precision, fantasia_compat, published)
    return paths


def write_raw_rows(root: Path, partition: Partition, raw: pl.DataFrame) -> dict[str, Path]:
    """The partition's raw rows (Parquet), which the run-wide outputs read, replaced whole."""
    paths = partition_paths(root, partition)
    exports.write_parquet_atomic(paths["raw"], raw)
    return paths


def write_raw_csv(
    root: Path,
    partition: Partition,
    raw: pl.DataFrame,
    shard_names: dict[str, str],
    precision: int,
    fantasia_compat: bool = False,
    published: Path | None = None,
) -> None:
    """The partition's raw CSV shards (a folder replaced whole); no other output reads them.

    `published`: experiment_path when `root` is a run's staging folder; its shards that stay
    byte for byte the same are linked, not rewritten (`exports.write_raw_shards`)."""
    shards = compat.with_length_columns(raw) if fantasia_compat else raw
    previous = partition_paths(published, partition)["shards"] if published is not None else None
    exports.write_raw_shards(
        partition_paths(root, partition)["shards"], shards, shards.columns, precision, shard_names, previous
    )


def partition_topgo_tables(
    raw: pl.DataFrame, precision: int, fantasia_compat: bool = False
) -> dict[str, pl.DataFrame]:
    """Category → the TopGO table of one partition's raw rows (FANTASIA's conventions in compat mode)."""
    per_layer = compat.topgo_tables(raw, precision) if fantasia_compat else topgo_tables(raw)
    return {category: table for (_, _, category), table in per_layer.items()}


def write_partition_topgo(
    root: Path, partition: Partition, raw: pl.DataFrame, precision: int, fantasia_compat: bool = False
) -> list[Path]:
    tables = partition_topgo_tables(raw, precision, fantasia_compat)
    return exports.write_topgo_dir(partition_paths(root, partition)["topgo"], tables, precision)


def read_raw_rows(root: Path, partitions: list[Partition]) -> pl.DataFrame:
    """The raw rows of the given partitions, from their Parquet files, in memory."""
    return pl.concat([pl.read_parquet(f) for f in raw_row_files(root, partitions)], how="diagonal_relaxed")


def raw_row_files(root: Path, partitions: list[Partition]) -> list[Path]:
    """The raw rows Parquet of each partition, in partition order; all must exist."""
    files = [partition_paths(root, p)["raw"] for p in partitions]
    missing = [str(f) for f in files if not f.exists()]
    if missing or not files:
        raise LookupPlanError(f"partitions not computed yet: {', '.join(missing) or 'none materialised'}")
    return files


def open_raw_rows(
    root: Path, partitions: list[Partition], spill: Path
) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
    """DuckDB over the partitions' raw rows (view `raw_rows`, `core.aggregate`), spilling to `spill`."""
    return aggregate.parquet_connection({aggregate.RAW_ROWS: raw_row_files(root, partitions)}, spill)


def write_summary(
    root: Path,
    partitions: list[Partition],
    spec: SummarySpec,
    limit_per_entry: int,
    precision: int,
    spill: Path,
    fantasia_compat: bool = False,
) -> aggregate.SummaryFile:
    """summary.csv over the partitions' raw rows: in memory for small runs, else DuckDB out of
    core (the same bytes, `core.aggregate_memory`), or FANTASIA's arithmetic."""
    path = root / SUMMARY
    if fantasia_compat:  # FANTASIA rounds as it goes: polars, on the rows in memory
        summary = compat.summary(read_raw_rows(root, partitions), spec, limit_per_entry, precision)
        exports.write_bytes_atomic(path, exports.csv_bytes(summary, precision))
        return aggregate.SummaryFile(path, summary.height, tuple(summary.columns))
    files = raw_row_files(root, partitions)
    if aggregate_memory.row_count(files) <= aggregate_memory.IN_MEMORY_ROWS:
        return aggregate_memory.write_summary(files, spec, limit_per_entry, path, precision)
    with open_raw_rows(root, partitions, spill) as rows:
        return aggregate.write_summary(rows, spec, limit_per_entry, path, precision)


def write_ensemble(
    root: Path, partitions: list[Partition], precision: int, spill: Path, topgo_written: bool = False
) -> list[Path]:
    """The TopGO ensemble: in memory for small runs, else DuckDB out of core (the same tables).

    `topgo_written`: the caller wrote the TopGO files of the partition under `root` from these
    raw rows, FANTASIA's conventions off (`write_partition_topgo`). The ensemble of a single
    partition is then those files byte for byte, and they are copied (≈1 s of CPU at FANTASIA's
    size): both keep the best reliability index of each (category, accession, GO id) over rows
    with a category and an index, sorted by category, accession, GO id, written by
    `exports.write_topgo_dir` at the same precision. What could tell them apart is ruled out
    first: a NaN index (the ensemble skips NaN unless all are, as `max` does; not relied on) and
    a null accession or GO id (sorted first in the ensemble, last in a partition's files)."""
    files = raw_row_files(root, partitions)
    if topgo_written and len(partitions) == 1 and _plain_terms(files[0]):
        return _copy_topgo(partition_paths(root, partitions[0])["topgo"], root / ENSEMBLE)
    if aggregate_memory.row_count(files) <= aggregate_memory.IN_MEMORY_ROWS:
        return exports.write_topgo_dir(root / ENSEMBLE, aggregate_memory.ensemble_tables(files), precision)
    with open_raw_rows(root, partitions, spill) as rows:
        tables = aggregate.ensemble_tables(rows)
    return exports.write_topgo_dir(root / ENSEMBLE, tables, precision)


def _plain_terms(raw_rows: Path) -> bool:
    """Whether these raw rows hold no null accession or GO id and no NaN reliability index."""
    found = (
        pl.scan_parquet(raw_rows)
        .select(pl.col("accession", "go_id").null_count().sum(), pl.col("reliability_index").is_nan().sum())
        .collect()
    )
    return not any(found.row(0))


def _copy_topgo(source: Path, directory: Path) -> list[Path]:
    """`directory` (replaced whole) holding a copy of each `.topgo` file of `source`."""
    names = sorted(
        name for name in os.listdir(source) if name.endswith(".topgo") and not name.startswith(".")
    )

    def build(tmp: Path) -> None:
        for name in names:
            shutil.copyfile(source / name, tmp / name)

    exports.replace_dir(directory, build)
    return [directory / name for name in names]


def write_sequences(
    root: Path, queries: QuerySet, references: dict[int, str], precision: int
) -> tuple[Path, Path]:
    """sequences.fasta (>Q{query_idx}, >R{ref_idx}) and query_index_mapping.csv.

    `references`: the sequence of every reference the raw rows name.
    """
    fasta = root / FASTA
    records = incremental_fasta.reference_records(references)[0]
    # joined: one write call, not one per record
    exports.write_bytes_atomic(
        fasta, b"".join([incremental_fasta.query_records(queries.sequences), *records])
    )
    return fasta, write_mapping(root, queries, precision)


def write_mapping(root: Path, queries: QuerySet, precision: int) -> Path:
    """query_index_mapping.csv: each unique query sequence's index, accessions and length."""
    mapping = root / MAPPING
    exports.write_bytes_atomic(mapping, exports.csv_bytes(queries.mapping(), precision))
    return mapping


def write_run_records(
    root: Path, queries: QuerySet, partitions: list[Partition], shard_names: dict[str, str]
) -> dict[str, Path]:
    """output_names.csv (original name → file or folder name) and skipped_queries.csv.

    Names from data become file names only after sanitising (`exports.safe_name`); these files
    record the exact original of every changed or unchanged name, and every query group left
    out of the lookup (in the whole file, or of one partition) with the reason (read from the
    partitions' Parquet under `root`).
    """
    names = [("accession", accession, file) for accession, file in shard_names.items()]
    models = {p.model.name for p in partitions}
    names += [("model", model, exports.model_dir_name(model)) for model in sorted(models)]
    frame = pl.DataFrame(
        names, schema={"kind": pl.String, "name": pl.String, "file_name": pl.String}, orient="row"
    )
    names_path = root / OUTPUT_NAMES
    # not csv_bytes: names are recorded exactly (CSV quoting keeps line breaks), never rewritten
    exports.write_bytes_atomic(names_path, exports.utf8_csv(frame))
    skipped = [(group, "", reason) for group, reason in queries.catalogue.skipped]
    for partition in partitions:
        path = partition_paths(root, partition)["skipped"]
        if path.exists():
            skipped += [(group, partition.key, reason) for group, reason in pl.read_parquet(path).iter_rows()]
    skipped_path = root / SKIPPED
    skipped_frame = pl.DataFrame(
        skipped, schema={"group": pl.String, "partition": pl.String, "reason": pl.String}, orient="row"
    )
    exports.write_bytes_atomic(skipped_path, exports.utf8_csv(skipped_frame))
    return {"output names": names_path, "skipped queries": skipped_path}
