"""Where the outputs of a lookup live under `experiment_path` (SPEC §4): one place names them.

A partition's output set is its Parquet files, its raw shard folder and its TopGO folder; the
run-wide set is the summary, the TopGO ensemble, the FASTA, the query mapping and the two
records. The staging of a run (`core.staging`) builds both sets in this same layout.
"""

from __future__ import annotations

from pathlib import Path

from .plan import Partition

# the run-wide output set, relative to experiment_path (the ensemble is a folder)
SUMMARY = Path("summary.csv")
ENSEMBLE = Path("topgo") / "ensemble"
FASTA = Path("sequences.fasta")
MAPPING = Path("query_index_mapping.csv")
OUTPUT_NAMES = Path("output_names.csv")
SKIPPED = Path("skipped_queries.csv")
RUN_WIDE = (SUMMARY, ENSEMBLE, FASTA, MAPPING, OUTPUT_NAMES, SKIPPED)


def partition_files(partition: Partition) -> dict[str, Path]:
    """The partition's output set, relative to experiment_path: Parquet files and folders."""
    rel = partition.relative_dir()
    return {
        "hits": Path("parquet") / rel / "neighbour_hits.parquet",
        "no_hits": Path("parquet") / rel / "queries_without_neighbours.parquet",
        "skipped": Path("parquet") / rel / "skipped_queries.parquet",
        "raw": Path("parquet") / rel / "raw_rows.parquet",
        "shards": Path("raw_results") / rel,
        "topgo": Path("topgo") / rel,
    }


def partition_paths(root: Path, partition: Partition) -> dict[str, Path]:
    """`partition_files` under `root` (experiment_path, or a run's staging folder)."""
    return {name: root / rel for name, rel in partition_files(partition).items()}
