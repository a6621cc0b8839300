"""The lookup's science, stage by stage, on plain values: redundancy clusters, the exact k-NN
search of one partition, and its raw rows (GO transfer, lengths, alignment metrics).

Stages take arrays, frames and the settings they use; reading the database and the
configuration is the caller's (`fantasia_assets.runner`, the Dagster assets).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from . import exports
from .distributed import Exclusions, slice_exclusions
from .knn_numpy import engine_for
from .plan import LookupPlanError, Partition, QuerySet
from .progress import Progress, no_progress
from .queries import EmbeddingFileError, describe_key
from .redundancy import cluster_sequences, exclusion_csr
from .references import ReferenceMatrix
from .sequences import clean, usable
from .timing import part, timed
from .transfer import (
    ASPECT_HIT_SCHEMA,
    ASPECTS,
    HIT_SCHEMA,
    aspect_masks,
    neighbour_hits,
    transfer_annotations,
)

log = logging.getLogger(__name__)

# Code versions of the stages (Dagster's asset `code_version`): bumped when, for the same inputs,
# a stage would give other rows. The search's covers `usable_queries`, `core.knn` and the
# redundancy mask; the raw rows' covers `core.transfer` and `core.alignment`.
SEARCH_CODE_VERSION = "search-1"
RAW_ROWS_CODE_VERSION = "raw-rows-2"  # 2: the stops ending a sequence are not aligned

# alignment scores and lengths are whole numbers: written as integers, not with `precision` digits
COUNT_COLUMNS = ["alignment_score", "alignment_length", "alignment_score_sw", "alignment_length_sw"]
_WARN_EACH = 20

# reference sequence id → sequence, for the ids asked (a `db.stores.SequenceCache`, or a dict's lookup)
SequenceSource = Callable[[np.ndarray], Mapping[int, str]]


def redundancy_clusters(
    queries: QuerySet,
    reference_sequences: pl.DataFrame,
    *,
    identity: float,
    coverage: float,
    threads: int,
    cache_dir: Path,
    progress: Progress = no_progress,
    binary: str | None = None,
) -> dict[str, str]:
    """MMseqs2 clusters of every reference (`R{id}`) and query (`Q{query_idx}`) sequence.

    `binary`: the MMseqs2 executable (default: `redundancy.mmseqs_binary()`)."""
    sequences = {f"R{sid}": clean(seq) for sid, seq in reference_sequences.iter_rows()}
    sequences.update({f"Q{i}": seq for i, seq in enumerate(queries.sequences)})
    # MMseqs2 cannot read what breaks the sequence rule (an empty sequence, say): such a
    # sequence is its own cluster, so nothing is masked for it (its query was warned about)
    alone = sorted(name for name, seq in sequences.items() if not usable(seq))
    if alone:
        log.warning(
            "%d sequences cannot be clustered by MMseqs2 (empty, or not IUPAC protein letters): %s; "
            "redundancy masking does not apply to them",
            len(alone), ", ".join(alone[:10]) + (", …" if len(alone) > 10 else ""),
        )  # fmt: skip
    clusters = cluster_sequences(
        {name: seq for name, seq in sequences.items() if usable(seq)},
        identity=identity,
        coverage=coverage,
        threads=threads,
        cache_dir=cache_dir,
        progress=progress,
        binary=binary,
    )
    clusters.update({name: name for name in alone})
    return clusters


@dataclass
class SearchOutcome:
    hits: pl.DataFrame
    matrix: ReferenceMatrix
    n_queries: int
    queries_without_hits: list[str]
    timings: dict[str, float] = field(default_factory=dict)
    matrix_source: str | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (group, reason): not searched
    # the catalogue rows searched and their vectors as read (the engines never write to them):
    # what the incremental state digests, without reading them again (`incremental_run`)
    query_rows: np.ndarray | None = field(default=None, repr=False, compare=False)
    query_vectors: np.ndarray | None = field(default=None, repr=False, compare=False)


@dataclass(frozen=True)
class SearchSettings:
    """The configuration keys the search reads (the partition's model adds threshold and batch)."""

    metric: str = "cosine"
    backend: str = "torch"
    device: str = "cpu"
    limit_per_entry: int = 5
    batch_size: int = 516
    tie_expansion: bool = False
    screening: str = "auto"  # `core.screen`: the screen's arithmetic; results never depend on it
    per_aspect: bool = False  # k nearest per GO aspect among the references annotated in it


# (queries (n, dim), exclusion CSR or None, batch) → (start row, (distances, indices)) of every
# batch of `batch` rows, in order; per aspect, (start row, [(distances, indices) per `ASPECTS`])
BatchSearch = Callable[
    [np.ndarray, Exclusions | None, int], Iterable[tuple[int, tuple[np.ndarray, np.ndarray]]]
]


# The engine of the last in-process search, kept for the next one on the same matrix object and
# settings: a warm lookup (a long-lived Dagster process, a benchmark's second run) skips the build,
# which at a million references prepares a billion elements. One engine only, so memory stays
# bounded; an engine in use is taken out, so concurrent searches never share its buffers.
_idle_engine: dict[tuple, tuple[np.ndarray, object]] = {}  # key → (the vectors, the engine)
_idle_lock = threading.Lock()


def in_process_search(
    matrix: ReferenceMatrix,
    settings: SearchSettings,
    partition: Partition,
    masks: np.ndarray | None = None,
    started: Callable[[], None] | None = None,
    screens: list[str] | None = None,
) -> BatchSearch:
    """The engine built here on the matrix (or kept from the last search of it), searched batch
    after batch (a small CPU search in numpy alone, `knn_numpy.engine_for`: the same answer
    without torch's start-up); with `masks` (one boolean row per aspect over the matrix rows,
    `transfer.aspect_masks`), per aspect by `knn_aspect`, which drives `knn`'s engine.
    `started()` is called once the engine is built, before the first products; `screens`, when
    given, receives the built engine's screen (`SearchEngine.screening`) for the progress lines."""

    def search(vectors: np.ndarray, exclude: Exclusions | None, batch: int):
        n_references, dim = matrix.vectors.shape
        with part("engine: import"):  # torch's, on a first search in this process
            if masks is None:
                engine = engine_for(
                    settings.metric,
                    settings.backend,
                    settings.device,
                    settings.screening,
                    len(vectors),
                    n_references,
                    dim,
                )
            else:
                from .knn import SearchEngine
                from .knn_aspect import search_by_aspect

                engine = SearchEngine(
                    settings.metric, settings.backend, settings.device, screening=settings.screening
                )
        # the vectors object itself is part of the key (and kept alive with the engine, so its id
        # is not reused): a fingerprint alone would also match another matrix built in a test
        key = (id(matrix.vectors), matrix.fingerprint, type(engine).__name__, settings.metric,
               settings.backend, settings.device, settings.screening)  # fmt: skip
        with _idle_lock:
            kept = _idle_engine.pop(key, (None, None))[1]
        if kept is not None:
            engine = kept
        else:
            with part("engine: build"):
                engine = engine.build(matrix.vectors, kept=matrix.kept_operands)
        if screens is not None:  # the arithmetic it screens in, for the progress lines
            screens.append(engine.screening)
        if started is not None:
            started()
        for start in range(0, len(vectors), batch):
            stop = min(start + batch, len(vectors))
            arguments = dict(
                threshold=partition.model.distance_threshold,
                exclude=slice_exclusions(exclude, start, stop),
                tie_expansion=settings.tie_expansion,
            )
            if masks is None:
                yield start, engine.search(vectors[start:stop], settings.limit_per_entry, **arguments)
            else:
                found = search_by_aspect(
                    engine, masks, vectors[start:stop], settings.limit_per_entry, **arguments
                )
                yield start, found
        with _idle_lock:
            _idle_engine.clear()
            _idle_engine[key] = (matrix.vectors, engine)

    return search


def _where(settings: SearchSettings, batch_search: BatchSearch | None) -> str:
    """Where a search runs, for its progress lines: a user sees whether the card is used."""
    if batch_search is not None:
        return "on the Dask cluster"
    if settings.device == "cuda":
        with part("card's name"):  # CUDA's start, when nothing started it before
            import torch

            return f"on cuda ({torch.cuda.get_device_name()})"
    return "on the cpu"


def search_partition(
    queries: QuerySet,
    partition: Partition,
    matrix: ReferenceMatrix,
    settings: SearchSettings,
    clusters: dict[str, str] | None = None,
    progress: Progress = no_progress,
    timings: dict[str, float] | None = None,
    batch_search: BatchSearch | None = None,
    annotations: pl.DataFrame | None = None,
    ahead: QueriesAhead | None = None,
    started: Callable[[], None] | None = None,
) -> SearchOutcome:
    """Exact k-NN of every usable query of the partition against its reference matrix.

    The batches are searched in this process, or by `batch_search` (the runner's blocks on a
    Dask cluster, `core.distributed`), which must return the same batches in the same order.
    With `settings.per_aspect`, the k nearest per GO aspect among the references that carry an
    annotation in it (`annotations`: sequence_id, category); the hits then have an `aspect`
    column and rank neighbours within their aspect. `started()`, when given, is called once the
    products start (in this process: the engine built), so that a caller starts what it wants
    beside them rather than beside the build (`lookup_start.read_annotations`).
    """
    if settings.per_aspect and batch_search is not None:
        raise LookupPlanError("lookup.per_aspect runs in the lookup's process only, not on a Dask cluster")
    if settings.per_aspect and annotations is None:
        raise ValueError("a per-aspect search needs the reference annotations")
    timings = timings if timings is not None else {}
    with timed(timings, "read queries"):
        read = ahead.take(matrix.dim) if ahead is not None else None
        vectors, rows, skipped = usable_queries(queries, partition, matrix.dim, settings.metric, read=read)
    with timed(timings, "redundancy mask"):
        exclude = None
        if clusters is not None:
            exclude = exclusion_csr(
                [f"Q{i}" for i in queries.query_idx[rows]],
                [f"R{sid}" for sid in matrix.sequence_ids],
                clusters,
            )
    masks = aspect_masks(matrix.sequence_ids, annotations) if settings.per_aspect else None
    with timed(timings, "search"):
        label = f"search {partition.key} {_where(settings, batch_search)}"
        batch = partition.model.batch_size or settings.batch_size
        if batch_search is not None and started is not None:
            started()  # the products run on the cluster's workers
        screens: list[str] = []  # in this process: the engine's screen, known once it is built
        search = batch_search or in_process_search(matrix, settings, partition, masks, started, screens)
        searched = search(vectors, exclude, batch)
        parts = []
        for start, found in searched:
            stop = min(start + batch, len(rows))
            accessions = [queries.catalogue.accessions[r] for r in rows[start:stop]]
            query_idx = queries.query_idx[rows[start:stop]]
            if masks is None:
                parts.append(neighbour_hits(accessions, query_idx, *found, matrix.sequence_ids))
            else:
                parts.append(_aspect_hits(accessions, query_idx, found, matrix.sequence_ids))
            progress(label + (f", {screens[0]} screen" if screens else ""), stop, len(rows))
    schema = HIT_SCHEMA if masks is None else ASPECT_HIT_SCHEMA
    hits = pl.concat(parts) if parts else pl.DataFrame(schema=schema)
    found = set(hits["accession"].unique().to_list())
    without = sorted(
        queries.catalogue.accessions[r] for r in rows if queries.catalogue.accessions[r] not in found
    )
    return SearchOutcome(hits, matrix, len(rows), without, timings, None, skipped, rows, vectors)


def _aspect_hits(
    accessions: list[str], query_idx: np.ndarray, found: list, reference_ids: np.ndarray
) -> pl.DataFrame:
    """The hits of one batch searched per aspect: query by query in the batch's order, as the
    plain search's, then by aspect (`ASPECTS` order) and rank within the aspect."""
    frames = [
        neighbour_hits(accessions, query_idx, distances, indices, reference_ids, aspect)
        for aspect, (distances, indices) in zip(ASPECTS, found, strict=True)
    ]
    position = {accession: i for i, accession in enumerate(accessions)}
    aspect_order = {aspect: i for i, aspect in enumerate(ASPECTS)}
    return pl.concat(frames).sort(
        pl.col("accession").replace_strict(position, return_dtype=pl.Int64),
        pl.col("aspect").replace_strict(aspect_order, return_dtype=pl.Int8),
        "rank",
    )


def usable_queries(
    queries: QuerySet,
    partition: Partition,
    dim: int,
    metric: str | None = None,
    trusted: set[str] = frozenset(),
    read: tuple[np.ndarray, np.ndarray, list[tuple[str, str]]] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
    """The partition's query vectors that can be searched, and every query left out, with why.

    A query without this layer, with a vector of the wrong length or with NaN/Inf values,
    (cosine `metric`) a zero vector, or (euclidean) one too long to search, is left out with a
    warning naming the file, group and reason; the others are searched. When none is usable
    the partition fails with the first reasons (a wrong model id, typically). `trusted`
    accessions' vectors are left unread (`EmbeddingCatalogue.read_valid`). `read`: that read,
    already made (`QueriesAhead`).
    """
    catalogue = queries.catalogue
    key = (partition.type_id, partition.layer)
    vectors, rows, skipped = read if read is not None else catalogue.read_valid(key, dim, metric, trusted)
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


@dataclass
class QueriesAhead:
    """A partition's query vectors read while its reference matrix is still on its way (a cold
    matrix streams from the database for seconds after the query scan), under the length most of
    them have: the matrix's length nearly always. `take` hands the read over when the matrix has
    that length, else None (the search reads them again, for its length); a read that fails is
    dropped unseen, and the search's own read meets the error and reports it as before."""

    dim: int
    read: tuple[np.ndarray, np.ndarray, list[tuple[str, str]]] | None

    @classmethod
    def start(cls, queries: QuerySet, partition: Partition, metric: str | None) -> QueriesAhead | None:
        entries = queries.catalogue.layers.get((partition.type_id, partition.layer))
        if entries is None or not len(entries.dims):
            return None
        lengths, counts = np.unique(entries.dims, return_counts=True)
        dim = int(lengths[np.argmax(counts)])  # as `read_valid` picks it
        try:
            return cls(dim, queries.catalogue.read_valid((partition.type_id, partition.layer), dim, metric))
        except (EmbeddingFileError, OSError, ValueError):
            return None

    def take(self, dim: int) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]] | None:
        read, self.read = self.read, None  # handed over once: the caller owns the arrays
        return read if dim == self.dim else None


class AlignmentCache:
    """Alignment metrics by (query_idx, ref_idx), computed once per run across partitions."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._known = pl.DataFrame(schema={"query_idx": pl.Int64, "ref_idx": pl.Int64})

    def preload(self, known: pl.DataFrame) -> None:
        """Take metrics computed before (query_idx, ref_idx and the metric columns, as raw rows
        hold them) as known: an incremental run reuses its previous run's alignments."""
        if known.height:
            merged = pl.concat([self._known, known], how="diagonal_relaxed")
            self._known = merged.unique(["query_idx", "ref_idx"], keep="first", maintain_order=True)

    def metrics(
        self, pairs: pl.DataFrame, query_sequences: list[str], ref_sequences: Mapping[int, str]
    ) -> pl.DataFrame:
        pairs = pairs.select("query_idx", "ref_idx").unique().sort("query_idx", "ref_idx")
        new = pairs.join(self._known.select("query_idx", "ref_idx"), on=["query_idx", "ref_idx"], how="anti")
        if new.height:
            # unusable query sequences were warned about when the query file was opened;
            # references loaded before the sequence rule existed are named here
            bad_refs = sorted({i for i in new["ref_idx"].to_list() if not usable(clean(ref_sequences[i]))})
            if bad_refs:
                log.warning(
                    "reference sequences %s break the sequence rule (empty, or not IUPAC protein "
                    "letters): their alignment metrics are left empty; reload them to fix it",
                    ", ".join(f"R{i}" for i in bad_refs[:10]) + (", …" if len(bad_refs) > 10 else ""),
                )
            from .alignment import alignment_metrics  # parasail: only for a lookup that aligns

            computed = alignment_metrics(
                [query_sequences[i] for i in new["query_idx"].to_list()],
                [ref_sequences[i] for i in new["ref_idx"].to_list()],
                workers=self.workers,
                skip_unusable=True,
            )
            self._known = pl.concat(
                [self._known, pl.concat([new, computed], how="horizontal")], how="diagonal"
            )
        return pairs.join(self._known, on=["query_idx", "ref_idx"], how="left")


@dataclass(frozen=True)
class RawRowSettings:
    """The configuration keys the raw rows read."""

    metric: str = "cosine"
    keep_sequences: bool = False
    alignment: bool = True
    alignment_workers: int = 4


def build_raw_rows(
    queries: QuerySet,
    partition: Partition,
    hits: pl.DataFrame,
    annotations: pl.DataFrame,
    sequences: SequenceSource,
    settings: RawRowSettings,
    alignments: AlignmentCache | None = None,
    timings: dict[str, float] | None = None,
) -> pl.DataFrame:
    """SPEC §4.1 raw rows of one partition, sorted by accession, rank, protein, GO id."""
    timings = timings if timings is not None else {}
    with timed(timings, "transfer"):
        rows = transfer_annotations(hits, annotations, settings.metric)
        ref_map = dict(sequences(rows["ref_idx"].to_numpy()))
        query_lengths = pl.DataFrame(
            {
                "query_idx": np.arange(len(queries.sequences)),
                "query_len": [len(s) for s in queries.sequences],
            },
            schema={"query_idx": pl.Int64, "query_len": pl.Int64},
        )
        ref_lengths = pl.DataFrame(
            {"ref_idx": list(ref_map), "ref_len": [len(s) for s in ref_map.values()]},
            schema={"ref_idx": pl.Int64, "ref_len": pl.Int64},
        )
        rows = rows.join(query_lengths, on="query_idx", how="left").join(
            ref_lengths, on="ref_idx", how="left"
        )
        rows = rows.with_columns(
            pl.lit(partition.model.name).alias("model_name"),
            pl.lit(partition.type_id, dtype=pl.Int64).alias("embedding_type_id"),
            pl.lit(partition.layer, dtype=pl.Int64).alias("layer_index"),
            pl.lit(settings.metric).alias("distance_metric"),
            pl.lit(partition.model.distance_threshold, dtype=pl.Float64).alias("distance_threshold"),
        )
        if settings.keep_sequences:
            # a gather, not a Python call per row
            query_sequences = pl.Series(queries.sequences, dtype=pl.String)
            rows = rows.with_columns(
                pl.lit(query_sequences).gather(pl.col("query_idx")).alias("sequence_query"),
                pl.col("ref_idx").replace_strict(ref_map, return_dtype=pl.String).alias("sequence_reference"),
            )
    if settings.alignment and rows.height:
        with timed(timings, "alignment"):
            cache = alignments or AlignmentCache(settings.alignment_workers)
            metrics = cache.metrics(rows, queries.sequences, ref_map)
            rows = rows.join(metrics, on=["query_idx", "ref_idx"], how="left").with_columns(
                pl.col(COUNT_COLUMNS).cast(pl.Int64)
            )
    # the same types with or without rows: an empty partition's alignment columns were never made
    schema = exports.raw_schema(settings.keep_sequences, settings.alignment)
    if not rows.height:
        return pl.DataFrame(schema=schema)
    return rows.sort(["accession", "rank", "protein_id", "go_id"]).select(
        pl.col(name).cast(dtype) for name, dtype in schema.items()
    )
