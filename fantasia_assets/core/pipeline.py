"""The lookup, stage by stage: plan partitions, search, transfer, align, write.

A *partition* is one (model, layer). The stage functions here are what both the CLI
(`run_lookup`, everything in-process) and the Dagster assets call; they hold the science's
order of operations, the assets only schedule them.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl
from sqlalchemy.engine import Engine

from fantasia_assets.errors import FantasiaError

from ..config import LookupConfig, ModelConfig
from ..progress import Progress, no_progress
from . import aggregate, exports, lineage
from .alignment import alignment_metrics
from .knn import SearchEngine
from .queries import (
    ACCESSION_PREFIX,
    EmbeddingCatalogue,
    EmbeddingFileError,
    describe_key,
    file_digest,
    scan,
    scan_cached,
)
from .redundancy import cluster_sequences, exclusion_csr
from .references import (
    AnnotationStore,
    ReferenceError,
    ReferenceMatrix,
    ReferenceScope,
    ReferenceStore,
    SequenceCache,
    fetch_reference_sequences,
)
from .summary import topgo_tables
from .transfer import HIT_SCHEMA, neighbour_hits, transfer_annotations

log = logging.getLogger(__name__)

# alignment scores and lengths are whole numbers: written as integers, not with `precision` digits
COUNT_COLUMNS = ["alignment_score", "alignment_length", "alignment_score_sw", "alignment_length_sw"]


class LookupPlanError(FantasiaError, RuntimeError):
    """The lookup cannot run as configured (no usable model or layer)."""


# ---------------------------------------------------------------------------------------------
# queries


@dataclass
class QuerySet:
    """The query file: its catalogue, and unique sequences (query_idx) shared by accessions."""

    catalogue: EmbeddingCatalogue
    query_idx: np.ndarray  # int64 per catalogue row: index of its unique sequence
    sequences: list[str]  # unique sequences, by query_idx
    content_hash: str

    @property
    def path(self) -> Path:
        return self.catalogue.path

    @cached_property
    def shard_names(self) -> dict[str, str]:
        """Accession → raw shard file name: sanitised, and unique even on case-blind file systems."""
        return exports.unique_file_names(self.catalogue.accessions, ".csv")

    def mapping(self) -> pl.DataFrame:
        """query_index_mapping.csv: query_idx, query_fasta_id, accessions, sequence_length."""
        frame = pl.DataFrame(
            {"query_idx": self.query_idx, "accession": self.catalogue.accessions},
            schema={"query_idx": pl.Int64, "accession": pl.String},
        )
        return (
            frame.group_by("query_idx")
            .agg(pl.col("accession").sort().str.join("|").alias("accessions"))
            .sort("query_idx")
            .with_columns(
                (pl.lit("Q") + pl.col("query_idx").cast(pl.String)).alias("query_fasta_id"),
                pl.Series("sequence_length", [len(s) for s in self.sequences], dtype=pl.Int64),
            )
            .select("query_idx", "query_fasta_id", "accessions", "sequence_length")
        )


def open_queries(path: Path, cache_dir: Path | None = None) -> QuerySet:
    """Scan the query HDF5 and number its unique sequences in order of first appearance."""
    if cache_dir is not None:
        catalogue, digest = scan_cached(path, cache_dir)
    else:
        catalogue, digest = scan(path), file_digest(path)
    if not catalogue.accessions:
        detail = ""
        if catalogue.skipped:
            group, reason = catalogue.skipped[0]
            detail = f"; {len(catalogue.skipped)} groups unusable, first {group}: {reason}"
        raise EmbeddingFileError(
            f"{path}: no query proteins (no usable '{ACCESSION_PREFIX}<ID>' group){detail}"
        )
    _warn_mapped_duplicates(catalogue)
    index: dict[str, int] = {}
    query_idx = np.empty(len(catalogue.accessions), dtype=np.int64)
    for row, sequence in enumerate(catalogue.sequences):
        query_idx[row] = index.setdefault(sequence.upper(), len(index))
    return QuerySet(catalogue, query_idx, list(index), digest)


def _warn_mapped_duplicates(catalogue: EmbeddingCatalogue) -> None:
    """Warn about groups that name the same protein once '|' is written as '_' (SPEC §2.1).

    Both are kept as separate queries under their own names (their output files differ too);
    the warning tells the user the file probably holds one protein twice.
    """
    seen: dict[str, str] = {}
    for accession in catalogue.accessions:
        mapped = accession.replace("|", "_")
        if mapped in seen:
            log.warning(
                "%s: groups %s%s and %s%s are the same accession once '|' is written as '_'; "
                "both are kept as separate queries",
                catalogue.path, ACCESSION_PREFIX, seen[mapped], ACCESSION_PREFIX, accession,
            )  # fmt: skip
        else:
            seen[mapped] = accession


# ---------------------------------------------------------------------------------------------
# partitions


@dataclass(frozen=True)
class Partition:
    """One (model, layer) of the lookup."""

    model: ModelConfig
    type_id: int
    layer: int | None

    @property
    def key(self) -> str:
        return f"{self.model.name}|{exports.layer_dir_name(self.layer)}"

    def relative_dir(self) -> Path:
        return Path(exports.model_dir_name(self.model.name)) / exports.layer_dir_name(self.layer)


def model_types(engine: Engine) -> dict[str, int]:
    """Model name → embedding type id, from the reference database."""
    import sqlalchemy as sa
    from psycopg.errors import UndefinedTable

    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT name, id FROM sequence_embedding_type ORDER BY id")).all()
    except sa.exc.ProgrammingError as error:
        if isinstance(error.orig, UndefinedTable):
            raise ReferenceError(
                "the reference database has no reference tables yet: load a reference set first "
                "(fantasia-assets load-references --help)"
            ) from error
        raise
    return {name: int(type_id) for name, type_id in rows}


def plan_partitions(config: LookupConfig, queries: QuerySet, types: dict[str, int]) -> list[Partition]:
    """Enabled models known to the database × requested layers present in the query file."""
    partitions = []
    known = set(types.values())
    for type_id in queries.catalogue.type_ids():
        if type_id not in known:
            log.warning(
                "%s: type_%d embeddings match no model of the reference database (known: %s); ignored",
                queries.path, type_id, ", ".join(f"{n}=type_{i}" for n, i in sorted(types.items())) or "none",
            )  # fmt: skip
    for model in config.enabled_models():
        if model.name not in types:
            log.warning(
                "model %r is enabled but not in the reference database (known: %s); skipped",
                model.name, ", ".join(sorted(types)) or "none",
            )  # fmt: skip
            continue
        type_id = types[model.name]
        available = queries.catalogue.layer_indices(type_id)
        requested = list(model.layer_index) if model.layer_index is not None else available
        effective = [layer for layer in requested if layer in available]
        log.info(
            "model %s (type_%d): layers requested %s, in the query file %s, used %s",
            model.name, type_id, requested, available, effective,
        )  # fmt: skip
        missing = [layer for layer in requested if layer not in available]
        if not available:
            log.warning(
                "model %s: %s has no type_%d embeddings at all; model skipped",
                model.name,
                queries.path,
                type_id,
            )
        elif missing:
            log.warning("model %s: layers %s are not in %s; skipped", model.name, missing, queries.path)
        partitions.extend(Partition(model, type_id, layer) for layer in effective)
    return partitions


def reference_scope(config: LookupConfig, partition: Partition) -> ReferenceScope:
    include, exclude = config.taxonomy.resolve()
    return ReferenceScope(partition.type_id, partition.layer, include, exclude, config.limit_execution)


def resolve_device(config: LookupConfig) -> str:
    """ "cuda" when the GPU is wanted, the backend is torch and a GPU is present; else "cpu"."""
    if config.use_gpu and config.backend == "torch":
        import torch

        if torch.cuda.is_available():
            return "cuda"
    return "cpu"


# ---------------------------------------------------------------------------------------------
# redundancy


def redundancy_clusters(
    config: LookupConfig,
    queries: QuerySet,
    engine: Engine,
    partitions: list[Partition],
    cache_dir: Path,
    progress: Progress = no_progress,
) -> dict[str, str] | None:
    """MMseqs2 clusters of every reference and query sequence, or None when masking is off."""
    if config.redundancy.identity <= 0 or not partitions:
        return None
    include, exclude = config.taxonomy.resolve()
    references = fetch_reference_sequences(engine, sorted({p.type_id for p in partitions}), include, exclude)
    sequences = {f"R{sid}": seq for sid, seq in references.iter_rows()}
    sequences.update({f"Q{i}": seq for i, seq in enumerate(queries.sequences)})
    return cluster_sequences(
        sequences,
        identity=config.redundancy.identity,
        coverage=config.redundancy.coverage,
        threads=config.redundancy.threads,
        cache_dir=cache_dir,
        progress=progress,
    )


# ---------------------------------------------------------------------------------------------
# search


@dataclass
class SearchOutcome:
    hits: pl.DataFrame
    matrix: ReferenceMatrix
    n_queries: int
    queries_without_hits: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    matrix_source: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (group, reason): not searched


def search_partition(
    config: LookupConfig,
    queries: QuerySet,
    partition: Partition,
    store: ReferenceStore,
    clusters: dict[str, str] | None = None,
    device: str | None = None,
    progress: Progress = no_progress,
) -> SearchOutcome:
    """Exact k-NN of every query of the partition against its reference matrix."""
    timings: dict[str, float] = {}
    started = time.perf_counter()
    matrix = store.get(reference_scope(config, partition), progress)
    timings["references"] = time.perf_counter() - started
    started = time.perf_counter()
    vectors, rows, skipped = usable_queries(queries, partition, matrix.dim)
    timings["read queries"] = time.perf_counter() - started
    started = time.perf_counter()
    exclude = None
    if clusters is not None:
        exclude = exclusion_csr(
            [f"Q{i}" for i in queries.query_idx[rows]],
            [f"R{sid}" for sid in matrix.sequence_ids],
            clusters,
        )
    timings["redundancy mask"] = time.perf_counter() - started

    started = time.perf_counter()
    engine = SearchEngine(config.distance_metric, config.backend, device or resolve_device(config))
    engine.build(matrix.vectors)
    batch = partition.model.batch_size or config.batch_size
    parts = []
    for start in range(0, len(rows), batch):
        stop = min(start + batch, len(rows))
        batch_exclude = None
        if exclude is not None:
            indptr, indices = exclude
            batch_exclude = (indptr[start : stop + 1] - indptr[start], indices[indptr[start] : indptr[stop]])
        distances, indices = engine.search(
            vectors[start:stop],
            config.limit_per_entry,
            threshold=partition.model.distance_threshold,
            exclude=batch_exclude,
            tie_expansion=config.tie_expansion,
        )
        parts.append(
            neighbour_hits(
                [queries.catalogue.accessions[r] for r in rows[start:stop]],
                queries.query_idx[rows[start:stop]],
                distances,
                indices,
                matrix.sequence_ids,
            )
        )
        progress(f"search {partition.key}", stop, len(rows))
    timings["search"] = time.perf_counter() - started
    hits = pl.concat(parts) if parts else pl.DataFrame(schema=HIT_SCHEMA)
    found = set(hits["accession"].unique().to_list())
    without = sorted(
        queries.catalogue.accessions[r] for r in rows if queries.catalogue.accessions[r] not in found
    )
    return SearchOutcome(hits, matrix, len(rows), without, timings, store.last_source, skipped)


def usable_queries(
    queries: QuerySet, partition: Partition, dim: int
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """The partition's query vectors that can be searched, and every query left out, with why.

    A query without this layer, with a vector of the wrong length or with NaN/Inf values is
    left out with a warning naming the file, group and reason; the others are searched. When
    none is usable the partition fails with the first reasons (a wrong model id, typically).
    """
    catalogue = queries.catalogue
    key = (partition.type_id, partition.layer)
    vectors, rows, skipped = catalogue.read_valid(key, dim)
    present = np.zeros(len(catalogue.accessions), dtype=bool)
    present[catalogue.layers[key].rows] = True
    absent = [
        (catalogue.group(int(r)), f"no {describe_key(key)} embedding") for r in np.flatnonzero(~present)
    ]
    skipped = absent + skipped
    if not len(rows):
        reasons = "; ".join(f"{group}: {reason}" for group, reason in skipped[:3])
        raise LookupPlanError(
            f"{queries.path}: no usable query vector for {partition.model.name} "
            f"{exports.layer_dir_name(partition.layer)} (reference vectors have {dim} values; is "
            f"type_{partition.type_id} the right model?): {reasons}"
        )
    for group, reason in skipped[:_WARN_EACH]:
        log.warning("%s: %s left out of %s: %s", queries.path, group, partition.key, reason)
    if len(skipped) > _WARN_EACH:
        log.warning(
            "%s: %d more queries left out of %s; all are listed in skipped_queries.csv",
            queries.path, len(skipped) - _WARN_EACH, partition.key,
        )  # fmt: skip
    return vectors, rows, skipped


_WARN_EACH = 20


# ---------------------------------------------------------------------------------------------
# GO transfer and alignment


class AlignmentCache:
    """Alignment metrics by (query_idx, ref_idx), computed once per run across partitions."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._known = pl.DataFrame(schema={"query_idx": pl.Int64, "ref_idx": pl.Int64})

    def metrics(
        self, pairs: pl.DataFrame, query_sequences: list[str], ref_sequences: dict[int, str]
    ) -> pl.DataFrame:
        pairs = pairs.select("query_idx", "ref_idx").unique().sort("query_idx", "ref_idx")
        new = pairs.join(self._known.select("query_idx", "ref_idx"), on=["query_idx", "ref_idx"], how="anti")
        if new.height:
            computed = alignment_metrics(
                [query_sequences[i] for i in new["query_idx"].to_list()],
                [ref_sequences[i] for i in new["ref_idx"].to_list()],
                workers=self.workers,
            )
            self._known = pl.concat(
                [self._known, pl.concat([new, computed], how="horizontal")], how="diagonal"
            )
        return pairs.join(self._known, on=["query_idx", "ref_idx"], how="left")


def build_raw_rows(
    config: LookupConfig,
    queries: QuerySet,
    partition: Partition,
    hits: pl.DataFrame,
    annotations: pl.DataFrame,
    engine: Engine,
    alignments: AlignmentCache | None = None,
    timings: dict[str, float] | None = None,
    sequences: SequenceCache | None = None,
) -> pl.DataFrame:
    """SPEC §4.1 raw rows of one partition, sorted by accession, rank, protein, GO id."""
    timings = timings if timings is not None else {}
    started = time.perf_counter()
    rows = transfer_annotations(hits, annotations, config.distance_metric)
    ref_map = (sequences or SequenceCache(engine)).get(rows["ref_idx"].to_numpy())
    query_lengths = pl.DataFrame(
        {"query_idx": np.arange(len(queries.sequences)), "query_len": [len(s) for s in queries.sequences]},
        schema={"query_idx": pl.Int64, "query_len": pl.Int64},
    )
    ref_lengths = pl.DataFrame(
        {"ref_idx": list(ref_map), "ref_len": [len(s) for s in ref_map.values()]},
        schema={"ref_idx": pl.Int64, "ref_len": pl.Int64},
    )
    rows = rows.join(query_lengths, on="query_idx", how="left").join(ref_lengths, on="ref_idx", how="left")
    rows = rows.with_columns(
        pl.lit(partition.model.name).alias("model_name"),
        pl.lit(partition.type_id, dtype=pl.Int64).alias("embedding_type_id"),
        pl.lit(partition.layer, dtype=pl.Int64).alias("layer_index"),
        pl.lit(config.distance_metric).alias("distance_metric"),
        pl.lit(partition.model.distance_threshold, dtype=pl.Float64).alias("distance_threshold"),
    )
    if config.keep_sequences:
        rows = rows.with_columns(
            pl.col("query_idx")
            .map_elements(lambda i: queries.sequences[i], return_dtype=pl.String)
            .alias("sequence_query"),
            pl.col("ref_idx").replace_strict(ref_map, return_dtype=pl.String).alias("sequence_reference"),
        )
    timings["transfer"] = time.perf_counter() - started
    if config.alignment and rows.height:
        started = time.perf_counter()
        cache = alignments or AlignmentCache(config.store_workers)
        metrics = cache.metrics(rows, queries.sequences, ref_map)
        rows = rows.join(metrics, on=["query_idx", "ref_idx"], how="left").with_columns(
            pl.col(COUNT_COLUMNS).cast(pl.Int64)
        )
        timings["alignment"] = time.perf_counter() - started
    columns = exports.raw_columns(config.keep_sequences, config.alignment)
    if not rows.height:
        return pl.DataFrame(schema={c: rows.schema.get(c, pl.String) for c in columns})
    return rows.sort(["accession", "rank", "protein_id", "go_id"]).select(columns)


# ---------------------------------------------------------------------------------------------
# writing


def partition_paths(config: LookupConfig, partition: Partition) -> dict[str, Path]:
    base = config.experiment_path
    rel = partition.relative_dir()
    return {
        "hits": base / "parquet" / rel / "neighbour_hits.parquet",
        "no_hits": base / "parquet" / rel / "queries_without_neighbours.parquet",
        "skipped": base / "parquet" / rel / "skipped_queries.parquet",
        "raw": base / "parquet" / rel / "raw_rows.parquet",
        "shards": base / "raw_results" / rel,
        "topgo": base / "topgo" / rel,
    }


def write_hits(config: LookupConfig, partition: Partition, outcome: SearchOutcome) -> dict[str, Path]:
    """The partition's neighbours, and the queries that have none within the threshold."""
    paths = partition_paths(config, partition)
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


def read_hits(config: LookupConfig, partition: Partition) -> pl.DataFrame:
    path = partition_paths(config, partition)["hits"]
    if not path.exists():
        raise LookupPlanError(f"{partition.key}: neighbour hits not computed yet ({path})")
    return pl.read_parquet(path)


def write_raw(
    config: LookupConfig, partition: Partition, raw: pl.DataFrame, queries: QuerySet
) -> dict[str, Path]:
    """Raw rows (Parquet) and the raw CSV shards of one partition, each replaced whole."""
    paths = partition_paths(config, partition)
    exports.write_parquet_atomic(paths["raw"], raw)
    exports.write_raw_shards(paths["shards"], raw, raw.columns, config.precision, queries.shard_names)
    return paths


def write_partition_topgo(config: LookupConfig, partition: Partition, raw: pl.DataFrame) -> list[Path]:
    tables = {category: table for (_, _, category), table in topgo_tables(raw).items()}
    return exports.write_topgo_dir(partition_paths(config, partition)["topgo"], tables, config.precision)


def open_raw_rows(config: LookupConfig, partitions: list[Partition]):
    """DuckDB over the given partitions' raw rows Parquet (view `raw_rows`), spilling under $FANTASIA_HOME/tmp."""
    from ..paths import fantasia_home

    files = [partition_paths(config, p)["raw"] for p in partitions]
    missing = [str(f) for f in files if not f.exists()]
    if missing or not files:
        raise LookupPlanError(f"partitions not computed yet: {', '.join(missing) or 'none materialised'}")
    return aggregate.parquet_connection({aggregate.RAW_ROWS: files}, fantasia_home() / "tmp")


def write_summary(config: LookupConfig, partitions: list[Partition]) -> aggregate.SummaryFile:
    with open_raw_rows(config, partitions) as rows:
        return aggregate.write_summary(
            rows,
            config.summary,
            config.limit_per_entry,
            config.experiment_path / "summary.csv",
            config.precision,
        )


def write_ensemble(config: LookupConfig, partitions: list[Partition]) -> list[Path]:
    with open_raw_rows(config, partitions) as rows:
        tables = aggregate.ensemble_tables(rows)
    return exports.write_topgo_dir(config.experiment_path / "topgo" / "ensemble", tables, config.precision)


def write_sequences(
    config: LookupConfig,
    queries: QuerySet,
    raw: pl.DataFrame,
    engine: Engine,
    sequences: SequenceCache | None = None,
) -> tuple[Path, Path]:
    """sequences.fasta (>Q{query_idx}, >R{ref_idx}) and query_index_mapping.csv."""
    refs = (sequences or SequenceCache(engine)).get(raw["ref_idx"].to_numpy()) if raw.height else {}
    records = [(f"Q{i}", s) for i, s in enumerate(queries.sequences)]
    records += [(f"R{sid}", s) for sid, s in sorted(refs.items())]
    fasta = config.experiment_path / "sequences.fasta"
    exports.write_bytes_atomic(fasta, exports.fasta_bytes(records))
    mapping = config.experiment_path / "query_index_mapping.csv"
    exports.write_bytes_atomic(mapping, exports.csv_bytes(queries.mapping(), config.precision))
    return fasta, mapping


def write_run_records(
    config: LookupConfig, queries: QuerySet, partitions: list[Partition]
) -> dict[str, Path]:
    """output_names.csv (original name → file or folder name) and skipped_queries.csv.

    Names from data become file names only after sanitising (`exports.safe_name`); these files
    record the exact original of every changed or unchanged name, and every query group left
    out of the lookup (in the whole file, or of one partition) with the reason.
    """
    names = [("accession", accession, file) for accession, file in queries.shard_names.items()]
    models = {p.model.name for p in partitions}
    names += [("model", model, exports.model_dir_name(model)) for model in sorted(models)]
    frame = pl.DataFrame(
        names, schema={"kind": pl.String, "name": pl.String, "file_name": pl.String}, orient="row"
    )
    names_path = config.experiment_path / "output_names.csv"
    # not csv_bytes: names are recorded exactly (CSV quoting keeps line breaks), never rewritten
    exports.write_bytes_atomic(names_path, frame.write_csv().encode("utf-8"))
    skipped = [(group, "", reason) for group, reason in queries.catalogue.skipped]
    for partition in partitions:
        path = partition_paths(config, partition)["skipped"]
        if path.exists():
            skipped += [(group, partition.key, reason) for group, reason in pl.read_parquet(path).iter_rows()]
    skipped_path = config.experiment_path / "skipped_queries.csv"
    exports.write_bytes_atomic(
        skipped_path,
        pl.DataFrame(
            skipped, schema={"group": pl.String, "partition": pl.String, "reason": pl.String}, orient="row"
        )
        .write_csv()
        .encode("utf-8"),
    )
    return {"output names": names_path, "skipped queries": skipped_path}


# ---------------------------------------------------------------------------------------------
# the whole lookup in one process (CLI)


@dataclass
class PartitionReport:
    partition: Partition
    n_queries: int
    n_hits: int
    n_rows: int
    queries_without_hits: int
    n_references: int
    matrix_source: str | None
    timings: dict[str, float]
    skipped: int = 0


@dataclass
class LookupResult:
    config: LookupConfig
    partitions: list[PartitionReport]
    outputs: dict[str, Path]
    timings: dict[str, float]

    def report_lines(self) -> list[str]:
        lines = []
        for p in self.partitions:
            lines.append(
                f"{p.partition.key}: {p.n_queries} queries × {p.n_references} references "
                f"(matrix from {p.matrix_source}), {p.n_hits} neighbours, {p.n_rows} GO rows, "
                f"{p.queries_without_hits} queries without neighbours within the threshold"
                + (f", {p.skipped} queries left out (skipped_queries.csv)" if p.skipped else "")
            )
        stages = sorted({s for p in self.partitions for s in p.timings} | set(self.timings))
        width = max((len(s) for s in stages), default=5)
        lines.append("")
        lines.append(f"{'stage':<{width}}  seconds")
        totals: dict[str, float] = defaultdict(float)
        for p in self.partitions:
            for stage, seconds in p.timings.items():
                totals[stage] += seconds
        for stage, seconds in self.timings.items():
            totals[stage] += seconds
        for stage in totals:
            lines.append(f"{stage:<{width}}  {totals[stage]:8.2f}")
        lines.append(f"{'total':<{width}}  {sum(totals.values()):8.2f}")
        lines.append("")
        lines.append(f"outputs under {self.config.experiment_path}:")
        for name, path in self.outputs.items():
            lines.append(f"  {name}: {path}")
        return lines


def run_lookup(
    config: LookupConfig, engine: Engine | None = None, progress: Progress = no_progress
) -> LookupResult:
    """The whole lookup for every enabled (model, layer), then the run-wide outputs."""
    from ..db import get_engine
    from ..paths import cache_dir

    engine = engine or get_engine()
    timings: dict[str, float] = {}
    started = time.perf_counter()
    queries = open_queries(config.embeddings_path, cache_dir("queries"))
    timings["scan queries"] = time.perf_counter() - started
    partitions = plan_partitions(config, queries, model_types(engine))
    if not partitions:
        raise LookupPlanError(
            f"no (model, layer) to compute: enabled models {[m.name for m in config.enabled_models()]}, "
            f"query file {queries.path}; see the warnings above"
        )
    started = time.perf_counter()
    clusters = redundancy_clusters(config, queries, engine, partitions, cache_dir("mmseqs"), progress)
    timings["redundancy clustering"] = time.perf_counter() - started
    started = time.perf_counter()
    annotations, annotation_version = AnnotationStore(engine, cache_dir("annotations")).get(
        reference_scope(config, partitions[0])
    )
    timings["annotations"] = time.perf_counter() - started
    store = ReferenceStore(engine, cache_dir("references"), config.lookup_cache_max)
    alignments = AlignmentCache(config.store_workers)
    sequences = SequenceCache(engine)
    device = resolve_device(config)
    reports, raw_frames, fingerprints = [], [], []
    for partition in partitions:
        outcome = search_partition(config, queries, partition, store, clusters, device, progress)
        raw = build_raw_rows(
            config,
            queries,
            partition,
            outcome.hits,
            annotations,
            engine,
            alignments,
            outcome.timings,
            sequences,
        )
        began = time.perf_counter()
        write_hits(config, partition, outcome)
        write_raw(config, partition, raw, queries)
        if config.topgo:
            write_partition_topgo(config, partition, raw)
        outcome.timings["write partition"] = time.perf_counter() - began
        fingerprints.append(outcome.matrix.fingerprint)
        raw_frames.append(raw.select("ref_idx"))  # all sequences.fasta needs; the summary reads Parquet
        reports.append(
            PartitionReport(
                partition,
                outcome.n_queries,
                outcome.hits.height,
                raw.height,
                len(outcome.queries_without_hits),
                len(outcome.matrix),
                outcome.matrix_source,
                outcome.timings,
                len(outcome.skipped),
            )  # fmt: skip
        )
    started = time.perf_counter()
    summary = write_summary(config, partitions)
    timings["summary"] = time.perf_counter() - started
    outputs = {"summary": summary.path, "raw shards": config.experiment_path / "raw_results"}
    raw_all = pl.concat(raw_frames)
    if config.topgo:
        started = time.perf_counter()
        write_ensemble(config, partitions)
        outputs["TopGO"] = config.experiment_path / "topgo"
        timings["topgo ensemble"] = time.perf_counter() - started
    started = time.perf_counter()
    fasta, mapping = write_sequences(config, queries, raw_all, engine, sequences)
    outputs["sequences"] = fasta
    outputs["query mapping"] = mapping
    outputs.update(write_run_records(config, queries, partitions))
    timings["fasta+mapping"] = time.perf_counter() - started
    # the lineage rows the assets would write: one per partition's raw rows, one for the summary
    run_id, config_hash = lineage.new_run_id(), config.fingerprint()
    rows = [
        lineage.LineageRow(
            run_id,
            "raw_result_shards",
            f"{exports.model_dir_name(r.partition.model.name)}|{exports.layer_dir_name(r.partition.layer)}",
            f"{fingerprint}-{annotation_version}",
            queries.content_hash,
            config_hash,
            {"queries": r.n_queries, "neighbours": r.n_hits, "rows": r.n_rows},
            r.timings,
            origin="cli",
        )
        for r, fingerprint in zip(reports, fingerprints, strict=True)
    ]
    counts = {"rows": summary.rows, "partitions": len(partitions)}
    summary_row = [run_id, "lookup_summary", None, annotation_version, queries.content_hash, config_hash]
    rows.append(lineage.LineageRow(*summary_row, counts, {"summary": timings["summary"]}, origin="cli"))
    lineage.record(config.experiment_path / "lineage.duckdb", rows)
    outputs["lineage"] = config.experiment_path / "lineage.duckdb"
    return LookupResult(config, reports, outputs, timings)
