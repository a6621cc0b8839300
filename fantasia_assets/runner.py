"""The lookup on a configuration and a reference database: what the CLI and the assets call.

Core stages (`core.plan`, `core.stages`, `core.writers`) take plain values; this module reads
them off a `LookupConfig`, fetches what the stages need from the database (`db.reads`,
`db.stores`) and hands the arrays and frames over. `run_lookup` is the whole lookup in one
process (the CLI's); the Dagster assets call the single stages below, one asset each.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from .config import LookupConfig
from .core import aggregate, writers
from .core.device import resolve_device
from .core.distributed import DaskSearch, cluster_search
from .core.layout import ENSEMBLE, FASTA, MAPPING, OUTPUT_NAMES, RUN_WIDE, SKIPPED, SUMMARY, partition_files
from .core.layout import partition_paths as _partition_paths
from .core.locks import experiment_lock
from .core.plan import LookupPlanError, ModelSpec, Partition, QuerySet, open_queries
from .core.plan import plan_partitions as _plan_partitions
from .core.progress import Progress, no_progress
from .core.references import ReferenceScope
from .core.scoring import run_predictions
from .core.stages import AlignmentCache, QueriesAhead, RawRowSettings, SearchOutcome, SearchSettings
from .core.stages import build_raw_rows as _build_raw_rows
from .core.stages import redundancy_clusters as _redundancy_clusters
from .core.stages import search_partition as _search_partition
from .core.staging import RunStaging
from .core.stale import remove_stale_partitions
from .core.timing import timed
from .db.snapshot import LiveReads, Reads, RecordedReads
from .db.stores import AnnotationStore, ReferenceStore, SequenceCache
from .errors import FantasiaError
from .lookup_start import first_scope, read_annotations, require_references, torch_ahead, with_references
from .paths import cache_dir, temporary_file
from .run_lineage import record_run_lineage
from .run_outputs import sequences_read_ahead, write_side_by_side

if TYPE_CHECKING:  # SQLAlchemy only where the database is used (`db.snapshot`), DuckDB by `writers`
    import duckdb
    import numpy as np
    from sqlalchemy.engine import Engine

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# configuration → plain values


def model_specs(config: LookupConfig) -> list[ModelSpec]:
    """The enabled models as the plan sees them. With a FASTA query file, only those that embed it:
    the others have no vectors there, and were named in a warning when it was embedded."""
    return [
        ModelSpec(m.name, m.distance_threshold, m.batch_size, m.layer_index)
        for m in config.enabled_models()
        if config.query_fasta is None or m.embed_with
    ]


def plan_partitions(config: LookupConfig, queries: QuerySet, types: dict[str, int]) -> list[Partition]:
    """Enabled models known to the database × requested layers present in the query file."""
    return _plan_partitions(model_specs(config), queries, types)


def reference_scope(config: LookupConfig, partition: Partition) -> ReferenceScope:
    include, exclude = config.taxonomy.resolve()
    return ReferenceScope(partition.type_id, partition.layer, include, exclude, config.limit_execution)


def device_for(config: LookupConfig) -> str:
    """ "cuda" when the GPU is wanted, the backend is torch and a GPU is present; else "cpu"."""
    return resolve_device(config.backend, use_gpu=config.use_gpu)


def search_settings(config: LookupConfig, device: str | None = None) -> SearchSettings:
    return SearchSettings(
        metric=config.distance_metric,
        backend=config.backend,
        device=device or device_for(config),
        limit_per_entry=config.limit_per_entry,
        batch_size=config.batch_size,
        tie_expansion=config.tie_expansion,
        screening=config.screening,
        per_aspect=config.per_aspect,
    )


def raw_row_settings(config: LookupConfig) -> RawRowSettings:
    return RawRowSettings(
        config.distance_metric, config.keep_sequences, config.alignment, config.alignment_threads
    )


# ---------------------------------------------------------------------------------------------
# stages that read the database


def redundancy_clusters(
    config: LookupConfig,
    queries: QuerySet,
    engine: Engine | Reads,
    partitions: list[Partition],
    cache: Path,
    progress: Progress = no_progress,
    binary: str | None = None,
) -> dict[str, str] | None:
    """MMseqs2 clusters of every reference and query sequence, or None when masking is off.

    `binary`: the MMseqs2 executable (the Dagster `mmseqs` resource's; default: found as
    `redundancy.mmseqs_binary` says). `engine` may be the run's `Reads` instead."""
    if config.redundancy.identity <= 0 or not partitions:
        return None
    include, exclude = config.taxonomy.resolve()
    reads = engine if isinstance(engine, (LiveReads, RecordedReads)) else LiveReads(engine)
    references = reads.fetch_reference_sequences(sorted({p.type_id for p in partitions}), include, exclude)
    return _redundancy_clusters(
        queries,
        references,
        identity=config.redundancy.identity,
        coverage=config.redundancy.coverage,
        threads=config.redundancy.threads,
        cache_dir=cache,
        progress=progress,
        binary=binary,
    )


def search_partition(
    config: LookupConfig,
    queries: QuerySet,
    partition: Partition,
    store: ReferenceStore,
    clusters: dict[str, str] | None = None,
    device: str | None = None,
    progress: Progress = no_progress,
    cluster: DaskSearch | None = None,
    annotations: pl.DataFrame | None = None,
    started: Callable[[], None] | None = None,
) -> SearchOutcome:
    """The partition's reference matrix (from the store), then the exact k-NN of its queries,
    in this process or, with `cluster`, in blocks on the Dask cluster's workers; `lookup.per_aspect`
    needs the reference `annotations`; `started()` once the products start (`core.stages`)."""
    timings: dict[str, float] = {}
    with timed(timings, "read queries"):  # while the matrix streams in, if it still does
        ahead = QueriesAhead.start(queries, partition, config.distance_metric) if store.fetching() else None
    with timed(timings, "references"):
        matrix = store.get(reference_scope(config, partition), progress)
    settings = search_settings(config, device)
    batch_search = None
    if cluster is not None:
        shared = store.shared_file(matrix)  # the workers' engines keep their operands beside it
        batch_search = cluster_search(
            cluster, partition, shared, matrix, settings, config.use_gpu, store.operands_prefix(shared)
        )
    outcome = _search_partition(
        queries, partition, matrix, settings, clusters, progress, timings, batch_search, annotations, ahead,
        started,
    )  # fmt: skip
    outcome.matrix_source = store.last_source
    return outcome


def build_raw_rows(
    config: LookupConfig,
    queries: QuerySet,
    partition: Partition,
    hits: pl.DataFrame,
    annotations: pl.DataFrame,
    engine: Engine | None,
    alignments: AlignmentCache | None = None,
    timings: dict[str, float] | None = None,
    sequences: Callable[[np.ndarray], dict[int, str]] | None = None,
) -> pl.DataFrame:
    """SPEC §4.1 raw rows of one partition (reference sequences from `sequences`, a
    `SequenceCache` say, or the database)."""
    return _build_raw_rows(
        queries,
        partition,
        hits,
        annotations,
        sequences or SequenceCache(engine),
        raw_row_settings(config),
        alignments,
        timings,
    )


# ---------------------------------------------------------------------------------------------
# outputs under experiment_path


def partition_paths(config: LookupConfig, partition: Partition) -> dict[str, Path]:
    return _partition_paths(config.experiment_path, partition)


def write_hits(config: LookupConfig, partition: Partition, outcome: SearchOutcome) -> dict[str, Path]:
    with experiment_lock(config.experiment_path, probe=False):
        return writers.write_hits(config.experiment_path, partition, outcome)


def read_hits(config: LookupConfig, partition: Partition) -> pl.DataFrame:
    return writers.read_hits(config.experiment_path, partition)


def shard_file_names(config: LookupConfig, queries: QuerySet) -> dict[str, str]:
    """Accession → raw shard file name under this configuration (FANTASIA's lower case in compat)."""
    return writers.shard_file_names(queries, config.fantasia_compat)


def write_raw(
    config: LookupConfig, partition: Partition, raw: pl.DataFrame, queries: QuerySet
) -> dict[str, Path]:
    with experiment_lock(config.experiment_path, probe=False):
        return writers.write_raw(
            config.experiment_path,
            partition,
            raw,
            shard_file_names(config, queries),
            config.precision,
            config.fantasia_compat,
        )


def write_partition_topgo(config: LookupConfig, partition: Partition, raw: pl.DataFrame) -> list[Path]:
    with experiment_lock(config.experiment_path, probe=False):
        return writers.write_partition_topgo(
            config.experiment_path, partition, raw, config.precision, config.fantasia_compat
        )


def partition_topgo_tables(config: LookupConfig, raw: pl.DataFrame) -> dict[str, pl.DataFrame]:
    """Category → what a partition's TopGO files hold, under this configuration's conventions."""
    return writers.partition_topgo_tables(raw, config.precision, config.fantasia_compat)


def read_raw_rows(config: LookupConfig, partitions: list[Partition]) -> pl.DataFrame:
    return writers.read_raw_rows(config.experiment_path, partitions)


@contextmanager
def open_raw_rows(config: LookupConfig, partitions: list[Partition]) -> Iterator[duckdb.DuckDBPyConnection]:
    """DuckDB over the partitions' raw rows (view `raw_rows`) under the memory limit of
    `core.aggregate`, spilling to a scratch folder under $FANTASIA_HOME/tmp (`paths`)."""
    with (
        temporary_file("-duckdb") as spill,
        writers.open_raw_rows(config.experiment_path, partitions, spill) as rows,
    ):
        yield rows


def write_summary(config: LookupConfig, partitions: list[Partition]) -> aggregate.SummaryFile:
    with experiment_lock(config.experiment_path, probe=False):
        return _summary_into(config.experiment_path, config, partitions)


def _summary_into(root: Path, config: LookupConfig, partitions: list[Partition]) -> aggregate.SummaryFile:
    """summary.csv under `root` (experiment_path or a run's staging), DuckDB spilling to scratch."""
    with temporary_file("-duckdb") as spill:
        return writers.write_summary(
            root,
            partitions,
            config.summary,
            config.limit_per_entry,
            config.precision,
            spill,
            config.fantasia_compat,
        )


def write_ensemble(config: LookupConfig, partitions: list[Partition]) -> list[Path]:
    with experiment_lock(config.experiment_path, probe=False), temporary_file("-duckdb") as spill:
        return writers.write_ensemble(config.experiment_path, partitions, config.precision, spill)


def reference_sequences_of(raw: pl.DataFrame, sequences: SequenceCache) -> dict[int, str]:
    """The sequence of every reference the raw rows name."""
    return sequences.get(raw["ref_idx"].to_numpy()) if raw.height else {}


def write_sequences(
    config: LookupConfig,
    queries: QuerySet,
    raw: pl.DataFrame,
    engine: Engine,
    sequences: SequenceCache | None = None,
) -> tuple[Path, Path]:
    references = reference_sequences_of(raw, sequences or SequenceCache(engine))
    with experiment_lock(config.experiment_path, probe=False):
        return writers.write_sequences(config.experiment_path, queries, references, config.precision)


def write_run_records(
    config: LookupConfig, queries: QuerySet, partitions: list[Partition]
) -> dict[str, Path]:
    with experiment_lock(config.experiment_path, probe=False):
        return writers.write_run_records(
            config.experiment_path, queries, partitions, shard_file_names(config, queries)
        )


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
    updates: dict = field(default_factory=dict)  # partition key → `core.incremental.Update`


def run_lookup(
    config: LookupConfig,
    engine: Engine | None = None,
    progress: Progress = no_progress,
    cluster: DaskSearch | None = None,
    reads: Reads | None = None,
    full: bool = False,
) -> LookupResult:
    """The whole lookup for every enabled (model, layer), then the run-wide outputs.

    Incremental (`incremental_run`): each partition searches only what changed since its stored
    state, or everything (`full`, or no usable state). All or nothing: every output set is built
    in a staging folder and published at the end (`core.staging`), so a run that fails part-way
    leaves the previous outputs (and states) as they were.
    `reads`: the database on `engine` (default), or a current stamp (`db.snapshot`).
    """
    from .incremental_run import PartitionUpdates

    if reads is None:
        from .db.engine import get_engine

        reads = LiveReads(engine or get_engine())
    # one run per experiment_path at a time; one committed reference set for the whole run; the
    # reads started before the query scan (`lookup_start`) end inside it, even when the run fails
    with (
        experiment_lock(config.experiment_path),
        reads.snapshot(),
        ThreadPoolExecutor(2, thread_name_prefix="lookup-start") as background,
    ):
        updates = PartitionUpdates(config, full=full)
        try:
            result = _run_lookup(config, reads, progress, cluster, updates, background)
        finally:
            updates.searching.set()  # a run that failed before it searched leaves no read waiting
        try:
            reads.finish()  # the stamp a later lookup may be served from
        except (FantasiaError, OSError) as error:
            log.warning("no cache stamp written (%s): the next lookup starts the server", error)
        return result


def _run_lookup(
    config: LookupConfig, reads: Reads, progress: Progress, cluster: DaskSearch | None, updates, background
) -> LookupResult:
    timings: dict[str, float] = {}
    # The annotation table depends on the taxonomy filter alone and the first partition's matrix on
    # the configuration (`lookup_start`): both are read while the query file is scanned (a big
    # file's table through a client COPY, beside the products: `read_annotations`), and torch and
    # CUDA started for a search on a card. Errors surface after the plan; an earlier error drops them.
    torch_ahead(config, searched_here=cluster is None)
    include, exclude = config.taxonomy.resolve()
    store = ReferenceStore(None, cache_dir("references"), config.lookup_cache_max, source=reads)
    store.prefetch(background, lambda: first_scope(config, model_specs(config), reads))
    annotations_of = AnnotationStore(None, cache_dir("annotations"), reads).get
    after = None if config.per_aspect else updates.searching  # per aspect: the table first
    pending = read_annotations(
        background, annotations_of, ReferenceScope(0, None, include, exclude), after, config,
        reads.copies_through_client,
    )  # fmt: skip
    with timed(timings, "scan queries"):
        queries = open_queries(config.embeddings_path, cache_dir("queries"))
    types = require_references(reads)
    partitions = with_references(plan_partitions(config, queries, types), reads)
    if not partitions:
        raise LookupPlanError(
            f"no (model, layer) to compute: enabled models {[m.name for m in config.enabled_models()]}, "
            f"query file {queries.path}; see the warnings above"
        )
    with timed(timings, "redundancy clustering"):
        clusters = redundancy_clusters(config, queries, reads, partitions, cache_dir("mmseqs"), progress)
    # only a per-aspect search reads the table: the others search while it is read, knowing its
    # version (which a search compares with the stored state) from one quick query
    with timed(timings, "annotations (wait)"):
        annotations, annotation_version = pending.result() if config.per_aspect else (None, None)
    annotation_version = updates.annotation_version = annotation_version or reads.annotation_version()
    alignments = updates.alignments
    sequences = SequenceCache(None, reads)
    device = device_for(config)
    shard_names = shard_file_names(config, queries)
    reports, raw_frames, entries, fingerprints = [], [], [], []
    from .incremental_write import OutputUpdates

    with RunStaging(config.experiment_path) as staging:
        root = staging.root
        # a first run's shard files are made while it searches (`core.ahead`)
        staging.make_ahead([partition_files(p)["shards"] for p in partitions], shard_names.values())
        # after the staging's recovery: the outputs it reads back are the published ones
        output_updates = OutputUpdates(config, updates, annotations, shard_names)
        for partition in partitions:
            if partition is partitions[-1]:  # all scopes read: the stamp's sequence files beside its products
                updates.products_started = partial(reads.prepare_finish, background)
            outcome = updates.search(
                queries, partition, store, clusters, device, progress, cluster, annotations
            )
            if partition is partitions[-1]:  # unless done as its products started (`db.snapshot`)
                reads.prepare_finish(background)
            if annotations is None:
                with timed(timings, "annotations (wait)"):
                    annotations, version = pending.result()
                if version != annotation_version:  # read twice: equal unless the tables were written
                    raise FantasiaError("the annotations changed while the lookup ran: run it again")
                output_updates.annotations = annotations

            # with no stored state every raw row is built: the neighbours' sequences are read meanwhile
            source = sequences_read_ahead(background, sequences, outcome, partition.key not in updates.stored)
            build = partial(
                build_raw_rows, config, queries, partition, annotations=annotations, engine=None,
                alignments=alignments, timings=outcome.timings, sequences=source,
            )  # fmt: skip

            # only the accessions whose inputs changed are rebuilt, where the state proves the rest;
            # the last partition's shards and TopGO, when written whole, and its state go beside
            # the run-wide outputs (`run_outputs`)
            last = partition is partitions[-1]
            raw, deferred = output_updates.write_partition(root, queries, partition, outcome, build, last)
            if not last:
                with timed(outcome.timings, "write partition"):
                    entries += updates.stage(root, partition)  # the state that proves these outputs
            at = len(entries)  # where the last partition's state goes
            entries += [
                path for name, path in partition_files(partition).items()
                if (config.topgo or name != "topgo") and path not in output_updates.patches
            ]  # fmt: skip
            raw_frames.append(raw.select("ref_idx"))  # all sequences.fasta needs; the summary reads Parquet
            fingerprints.append(outcome.matrix.fingerprint)
            counts = (outcome.n_queries, outcome.hits.height, raw.height, len(outcome.queries_without_hits))
            reports.append(
                PartitionReport(
                    partition, *counts, len(outcome.matrix), outcome.matrix_source, outcome.timings,
                    len(outcome.skipped),
                )
            )  # fmt: skip
        raw_all = pl.concat(raw_frames)
        written = write_side_by_side(
            config, root, queries, partitions, output_updates, updates, deferred, outcome,
            (raw_all, sequences), timings,
        )  # fmt: skip
        entries[at:at] = written["incremental state"]
        entries += [path for path in RUN_WIDE if config.topgo or path != ENSEMBLE] + written["fasta+mapping"]
        entries += output_updates.stage(root, partitions)  # the signatures of the files just written
        with timed(timings, "predictions"):
            predicted = run_predictions(
                root, lambda: writers.read_raw_rows(root, partitions), config.scoring, config.precision,
                [(p.model.name, p.layer) for p in partitions],  # those without neighbours too
            )  # fmt: skip
        entries += [path.relative_to(root) for path in predicted.values()]
        with timed(timings, "publish"):
            output_updates.publish(staging, entries)  # and the state it no longer keeps removed
    base = config.experiment_path
    record_run_lineage(
        config, queries, partitions, reports, fingerprints, annotation_version, written["summary"], timings
    )
    names = {"summary": SUMMARY, "raw shards": "raw_results", "lineage": "lineage.duckdb"}
    names |= {"TopGO": "topgo"} if config.topgo else {}
    names |= {"sequences": FASTA, "query mapping": MAPPING, "output names": OUTPUT_NAMES}
    names["skipped queries"] = SKIPPED
    outputs = {name: base / path for name, path in names.items()}
    outputs.update({name: base / path.relative_to(root) for name, path in predicted.items()})
    # every partition was just published: other partition folders are stale, an earlier run's
    # predictions.tsv when this one wrote none (no scoring.ontology), its TopGO files when none
    current, predicted_any = [p.relative_dir() for p in partitions], bool(predicted)
    for folder in remove_stale_partitions(base, current, predicted_any, config.topgo):
        outputs[f"removed, not part of this run any more: {folder.relative_to(base)}"] = folder
    return LookupResult(config, reports, outputs, timings, updates.updates)
