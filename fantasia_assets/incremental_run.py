"""Incremental whole-run lookups: each partition's neighbours from its stored state and what changed.

`runner.run_lookup` hands a `PartitionUpdates` to its run loop. For each partition it reads the
state the previous run left (`core.incremental`), compares it with the current references,
queries, annotations and settings, and searches only what the change needs (queries searched
in full, or merged with a search of the added references alone); a partition without a usable
state is searched in full, and the reason logged. The rest of the run (raw rows, shards, TopGO,
summary, predictions) is the full run's own code on those neighbours, and each partition's new
state is staged with its outputs, so it is published with them or not at all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import polars as pl

from .config import LookupConfig
from .core import incremental
from .core.distributed import DaskSearch
from .core.knn_numpy import engine_for
from .core.layout import partition_paths
from .core.lineage import CODE_VERSION
from .core.plan import Partition, QuerySet
from .core.progress import Progress
from .core.redundancy import exclusion_csr
from .core.row_digests import carried_digests, row_digests
from .core.stages import (
    RAW_ROWS_CODE_VERSION,
    SEARCH_CODE_VERSION,
    AlignmentCache,
    SearchOutcome,
    usable_queries,
)
from .core.timing import timed
from .db.stores import ReferenceStore

log = logging.getLogger(__name__)
# queries per search of the added references: each group's threshold is its largest stored k-th
# distance (`incremental.added_search_groups`); smaller groups have tighter thresholds, and fewer
# candidates to refine, but pay the search's per-call cost more often
MERGE_GROUP = 2500


def search_key(
    config: LookupConfig, partition: Partition, clusters: dict[str, str] | None
) -> incremental.SearchKey:
    """The settings that decide the partition's neighbours (backend, device, screening and batch
    sizes do not: every one returns the same neighbours, `core.knn`)."""
    masking = (config.redundancy.identity, config.redundancy.coverage) if clusters is not None else None
    return incremental.SearchKey(
        metric=config.distance_metric,
        k=config.limit_per_entry,
        tie_expansion=config.tie_expansion,
        threshold=partition.model.distance_threshold,
        masking=masking,
        clusters=incremental.clusters_digest(clusters),
        code=f"{incremental.STATE_FORMAT}|{SEARCH_CODE_VERSION}|{CODE_VERSION}",
    )


def settings_hash(config: LookupConfig) -> str:
    """The configuration's hash, wherever its outputs go: the state of an experiment_path copied
    or moved elsewhere stays valid, and equals a fresh run's there. Settings of speed alone are
    left out (`config.SPEED_SETTINGS`): changing one rebuilds nothing; so are those of the run-wide
    outputs alone (summary.csv and predictions.tsv are rebuilt by `run.json`'s own record)."""
    neutral = dataclasses.replace(config, experiment_path=Path("experiment_path"))
    return neutral.results_fingerprint(partition=True)


def outputs_hash(config: LookupConfig) -> str:
    """The settings of one partition's outputs (`incremental_write.outputs_hash`)."""
    from .incremental_write import outputs_hash as of

    return of(config, partition=True)


def query_digests(queries: QuerySet, rows: np.ndarray, vectors: np.ndarray) -> list[bytes]:
    """Per searched query: its vector's bytes and its sequence (a changed sequence renumbers it)."""
    sequences = queries.sequences
    # the digest of (vector digest + sequence bytes), hashed directly rather than as a 1-row array
    return [
        hashlib.blake2b(digest + sequences[i].encode(), digest_size=16).digest()
        for digest, i in zip(row_digests(vectors), queries.query_idx[rows].tolist(), strict=True)
    ]


def stored_query_digests(
    state: incremental.StoredState, queries: QuerySet, rows: np.ndarray, vectors: np.ndarray
) -> list[bytes]:
    """`query_digests`, taken from the state where it proves them: a query's digest is a function
    of the query file's bytes alone (its vector and sequence as this code reads them, and the
    state is this code's), so when the file is the one the state was computed on (its content
    digest), a stored accession's digest is its current one. The others are computed."""
    if state.meta.get("query_hash") != queries.content_hash:
        return query_digests(queries, rows, vectors)
    known = dict(zip(state.queries["accession"].to_list(), state.queries["digest"].to_list(), strict=True))
    accessions = [queries.catalogue.accessions[r] for r in rows.tolist()]
    digests = [known.get(accession) for accession in accessions]
    missing = np.array([i for i, digest in enumerate(digests) if digest is None], dtype=np.int64)
    if len(missing):
        for i, digest in zip(
            missing.tolist(), query_digests(queries, rows[missing], vectors[missing]), strict=True
        ):
            digests[i] = digest
    return digests


class PartitionUpdates:
    """The run loop's search and state staging; `updates` says what each partition's run did."""

    def __init__(
        self, config: LookupConfig, annotation_version: str | None = None, full: bool = False
    ) -> None:
        self.config = config
        self.full = full
        self.annotation_version = annotation_version
        self.alignments = AlignmentCache(config.alignment_threads)
        self.updates: dict[str, incremental.Update] = {}
        # partition key → (stored state, published output paths) of the partitions updated
        # incrementally: what `incremental_write` rebuilds their outputs against
        self.stored: dict[str, tuple[incremental.StoredState, dict[str, Path]]] = {}
        # partition key → the accessions searched anew (added, or their vector or sequence
        # changed): their outputs are rebuilt even when their neighbours did not move, since a
        # sequence also goes into the alignment columns and the query's length
        self.searched: dict[str, set[str]] = {}
        self._pending: dict[str, tuple] = {}
        # set once a full search's products start, or any search is over: what the run reads
        # beside the products waits for it (`lookup_start.read_annotations`); the run may also
        # hand a call to make as a full search's products start
        self.searching = threading.Event()
        self.products_started: Callable[[], None] | None = None

    def search(
        self,
        queries: QuerySet,
        partition: Partition,
        store: ReferenceStore,
        clusters: dict[str, str] | None,
        device: str,
        progress: Progress,
        cluster: DaskSearch | None,
        annotations: pl.DataFrame | None = None,
    ) -> SearchOutcome:
        try:
            return self._search(queries, partition, store, clusters, device, progress, cluster, annotations)
        finally:
            self.searching.set()
            self.products_started = None

    def _started(self) -> None:
        self.searching.set()
        if self.products_started is not None:
            self.products_started()

    def _search(self, queries, partition, store, clusters, device, progress, cluster, annotations):
        from .runner import search_partition

        config = self.config
        if config.per_aspect:
            # the aspect masks follow the annotations, so no stored list survives an annotation
            # change; a per-aspect search is always a full one, and keeps no state
            log.warning("%s: full search: per-aspect neighbours are not updated incrementally", partition.key)
            outcome = search_partition(
                config, queries, partition, store, clusters, device, progress, cluster, annotations
            )
            self.updates[partition.key] = incremental.Update(
                "full", "lookup.per_aspect is searched in full", searched=outcome.n_queries
            )
            return outcome
        key = search_key(config, partition, clusters)
        paths = partition_paths(config.experiment_path, partition)
        state, reason = None, "a full run was asked for (--full)" if self.full else None
        level = logging.INFO
        if reason is None:
            try:
                state = incremental.read_state(config.experiment_path, partition, key, paths)
            except incremental.StateMissing as error:
                reason = str(error)  # a first run: the report says so, no warning needed
            except incremental.StateUnusable as error:
                reason, level = str(error), logging.WARNING
        if state is None:
            log.log(level, "%s: full search: %s", partition.key, reason)
            outcome = search_partition(
                config, queries, partition, store, clusters, device, progress, cluster,
                started=self._started,
            )  # fmt: skip
            # the digests of every query and reference row (≈1 s of CPU at FANTASIA's size) are
            # needed only when the state is staged, after the partition's outputs: they are
            # taken in a thread meanwhile (hashing leaves the GIL), and `stage` waits for them
            digesting = ThreadPoolExecutor(1, thread_name_prefix="state-digests")
            digests = digesting.submit(
                _full_digests, queries, partition, outcome, config.distance_metric, store.row_digests
            )
            digesting.shutdown(wait=False)  # its one thread ends with the digests
            self._pending[partition.key] = (key, queries.content_hash, digests, outcome)
            self.updates[partition.key] = incremental.Update("full", reason, searched=outcome.n_queries)
            return outcome
        return self._incremental(queries, partition, store, clusters, device, progress, key, state, paths)

    def _incremental(
        self, queries, partition, store, clusters, device, progress, key, state, paths
    ) -> SearchOutcome:
        from .runner import reference_scope

        config, timings = self.config, {}
        with timed(timings, "references"):
            matrix = store.get(reference_scope(config, partition), progress)
        with timed(timings, "compare with the stored state"):
            ref_digests = _reference_digests(state, matrix, store, reference_scope(config, partition))
            same_references = (
                np.array_equal(state.references["sequence_id"].to_numpy(), matrix.sequence_ids)
                and ref_digests == state.references["digest"].to_list()
            )
        # the state's queries were usable in the file it was computed on (its content digest): when
        # this is that file and the references are the state's (no query is merged with a search
        # of added ones), a vector is read only if its query is searched (`_read_searched`)
        trusted = set()
        if same_references and state.meta.get("query_hash") == queries.content_hash:
            trusted = set(state.queries["accession"].to_list())
        with timed(timings, "read queries"):
            vectors, rows, skipped = usable_queries(
                queries, partition, matrix.dim, config.distance_metric, trusted
            )
        accessions = [queries.catalogue.accessions[r] for r in rows]
        with timed(timings, "compare with the stored state"):
            digests = stored_query_digests(state, queries, rows, vectors)
            changes = incremental.diff(
                state, matrix.sequence_ids, ref_digests, accessions, digests,
                self.annotation_version, settings_hash(config),
            )  # fmt: skip
        searched = set(incremental.queries_to_search(state, changes))
        position = {a: i for i, a in enumerate(accessions)}
        full_rows = np.array(sorted(position[a] for a in searched), dtype=np.int64)
        kept = [a for a in accessions if a not in searched]
        stored = state.neighbours.filter(pl.col("accession").is_in(kept))
        new_ids = np.union1d(changes.references_added, changes.references_changed)
        batch = partition.model.batch_size or config.batch_size
        answers = [stored]
        names = [f"Q{i}" for i in queries.query_idx[rows]] if clusters is not None else None

        def run_search(
            references: np.ndarray,
            ids: np.ndarray,
            groups: list[tuple[np.ndarray, float | None]],
        ) -> pl.DataFrame:
            """The answers of each group of query rows under its threshold, one engine for all."""
            # a small CPU search in numpy alone, as the full run's (`knn_numpy.engine_for`): the
            # same answers, without torch's start-up; else the full run's screen (bf16 on matrix
            # units: the merge's 20,000 × 2,500 product takes half the float32 one's CPU time)
            engine = engine_for(
                config.distance_metric, config.backend, device, config.screening,
                sum(len(group) for group, _ in groups), len(references), references.shape[1],
            )  # fmt: skip
            engine.build(references)
            parts = []
            for query_rows, threshold in groups:
                exclude = None
                if names is not None:
                    exclude = exclusion_csr([names[r] for r in query_rows], [f"R{s}" for s in ids], clusters)
                answer = incremental.search_rows(
                    engine, ids, [accessions[r] for r in query_rows], vectors[query_rows],
                    config.limit_per_entry, threshold, config.tie_expansion, batch, exclude,
                )  # fmt: skip
                parts.append(answer)
            return pl.concat(parts)

        with timed(timings, "search"):
            if trusted:
                merging = [position[a] for a in kept] if len(new_ids) else []
                _read_searched(queries, partition, rows, vectors, accessions, trusted, [*full_rows, *merging])
            if len(new_ids) and kept:
                at = np.flatnonzero(np.isin(matrix.sequence_ids, new_ids))
                kept_rows = np.array([position[a] for a in kept], dtype=np.int64)
                new_vectors, new_sequence_ids = matrix.vectors[at], matrix.sequence_ids[at]
                groups = incremental.added_search_groups(
                    stored, kept, config.limit_per_entry, partition.model.distance_threshold,
                    min(batch, MERGE_GROUP),
                )  # fmt: skip
                groups = [(kept_rows[group], limit) for group, limit in groups]
                added = run_search(new_vectors, new_sequence_ids, groups)
                answers = [
                    incremental.merge_answers(stored, added, config.limit_per_entry, config.tie_expansion)
                ]
            if len(full_rows):
                everything = [(full_rows, partition.model.distance_threshold)]
                answers.append(run_search(matrix.vectors, matrix.sequence_ids, everything))
        query_idx = dict(zip(accessions, queries.query_idx[rows].tolist(), strict=True))
        hits = incremental.assemble(answers, accessions, query_idx)
        found = set(hits["accession"].unique().to_list())
        without = sorted(a for a in accessions if a not in found)
        outcome = SearchOutcome(hits, matrix, len(rows), without, timings, store.last_source, skipped)
        known = _done((accessions, digests, ref_digests))
        self._pending[partition.key] = (key, queries.content_hash, known, outcome)
        kinds = changes.kinds()
        self.updates[partition.key] = incremental.Update(
            " + ".join(kinds) if kinds else "unchanged",
            searched=len(full_rows),
            merged=len(kept) if len(new_ids) else 0,
            details={name.replace(" ", "_"): n for name, n in _counts(changes).items()},
        )
        self._preload_alignments(state, paths, query_idx, kept)
        self.stored[partition.key] = (state, paths)
        self.searched[partition.key] = searched
        log.info("%s: incremental update (%s)", partition.key, self.updates[partition.key].kind)
        return outcome

    def _preload_alignments(self, state, paths, query_idx: dict[str, int], kept: list[str]) -> None:
        """The previous run's alignment metrics of kept queries, renumbered to this query file."""
        if not self.config.alignment or "raw" not in state.meta["outputs"]:
            return  # raw rows the state does not vouch for (the Dagster assets') are not reused
        if state.meta.get("raw_rows_code") != RAW_ROWS_CODE_VERSION:
            return  # aligned by other code (before ending stops were dropped, say)
        from .core.alignment import METRIC_COLUMNS  # parasail: only for lookups that align

        if not set(METRIC_COLUMNS) <= set(pl.read_parquet_schema(paths["raw"])):
            return  # the previous run had alignment off
        old = pl.read_parquet(paths["raw"], columns=["accession", "ref_idx", *METRIC_COLUMNS])
        old = old.filter(pl.col("accession").is_in(kept)).with_columns(
            pl.col("accession").replace_strict(query_idx, return_dtype=pl.Int64).alias("query_idx"),
            pl.col(list(METRIC_COLUMNS)).cast(pl.Float64),
        )
        self.alignments.preload(old.select("query_idx", "ref_idx", *METRIC_COLUMNS))

    def keeps_state(self, partition: Partition) -> bool:
        """Whether the partition's state is staged with its outputs (not a per-aspect search)."""
        return partition.key in self._pending

    def stage(
        self, root: Path, partition: Partition, outputs: tuple[str, ...] = ("hits", "raw")
    ) -> list[Path]:
        """Write the partition's state under `root` (the run's staging folder; experiment_path for
        the Dagster asset), after its `outputs`; returns the entry to publish with them."""
        if partition.key not in self._pending:
            return []  # a per-aspect search keeps no state: the next run is a full one
        key, query_hash, digests, outcome = self._pending.pop(partition.key)
        accessions, query_d, ref_d = digests.result()  # taken in a thread since the search
        meta = {
            "search_key": key.as_dict(),
            "config_hash": settings_hash(self.config),
            "outputs_config": outputs_hash(self.config),
            "raw_rows_code": RAW_ROWS_CODE_VERSION,
            "annotation_version": self.annotation_version or "",
            "reference_fingerprint": outcome.matrix.fingerprint,
            "query_hash": query_hash,
            "outputs": incremental.output_digests(partition_paths(root, partition), outputs),
        }
        incremental.write_state(
            root, partition, meta, outcome.hits, self.config.limit_per_entry,
            accessions, query_d, outcome.matrix.sequence_ids, ref_d,
        )  # fmt: skip
        return [incremental.state_dir(partition)]


def _full_digests(
    queries: QuerySet, partition: Partition, outcome: SearchOutcome, metric: str, references
) -> tuple[list[str], list[bytes], list[bytes]]:
    """A full search's state digests: its queries (the vectors it searched, or read again as it
    read them for an outcome that carries none) and every reference row of its matrix (by
    `references`, the store's `row_digests`: kept beside its cache file). The outcome's query
    vectors are let go once digested."""
    rows, vectors = outcome.query_rows, outcome.query_vectors
    if vectors is None:
        layer = (partition.type_id, partition.layer)
        vectors, rows, _ = queries.catalogue.read_valid(layer, outcome.matrix.dim, metric)
    outcome.query_vectors = None
    accessions = [queries.catalogue.accessions[r] for r in rows.tolist()]
    return accessions, query_digests(queries, rows, vectors), references(outcome.matrix)


def _done(value) -> Future:
    """`value` as a finished future (an incremental search's digests are taken as it compares)."""
    future = Future()
    future.set_result(value)
    return future


def _read_searched(queries, partition, rows, vectors, accessions, trusted, searched: list[int]) -> None:
    """Fill in place the `searched` rows of `vectors` that `usable_queries` left unread (trusted)."""
    unread = np.array(sorted(r for r in set(searched) if accessions[r] in trusted), dtype=np.int64)
    if len(unread):
        vectors[unread] = queries.catalogue.read((partition.type_id, partition.layer), rows[unread])[0]


def _reference_digests(state: incremental.StoredState, matrix, store: ReferenceStore, scope) -> list[bytes]:
    """The digest of each row of `matrix`, taken from the state where it proves the row unchanged.

    The store keys matrices by the fingerprint of their database rows and returns the cache file's
    contents for it, never anything else (a cache file is replaced whole, and only by the rows of
    the same fingerprint); the state's digests were taken of the matrix of its recorded
    fingerprint. So when that fingerprint is the current one, the stored digests are the current
    rows'; when the store still holds the older matrix, a row whose bytes equal its row there has
    the stored digest. Only rows without such proof are digested."""
    stored = state.references
    fingerprint = state.meta.get("reference_fingerprint")
    same_ids = len(stored) == len(matrix) and np.array_equal(
        stored["sequence_id"].to_numpy(), matrix.sequence_ids
    )
    if fingerprint == matrix.fingerprint and same_ids:
        return stored["digest"].to_list()
    previous = store.cached(scope, fingerprint) if isinstance(fingerprint, str) else None
    if previous is not None:
        digests = carried_digests(
            stored, previous.sequence_ids, previous.vectors, matrix.sequence_ids, matrix.vectors
        )
        if digests is not None:
            return digests
    return store.row_digests(matrix)


def _counts(changes: incremental.Changes) -> dict[str, int]:
    return {
        "references added": len(changes.references_added),
        "references removed": len(changes.references_removed),
        "references changed": len(changes.references_changed),
        "queries added": len(changes.queries_added),
        "queries removed": len(changes.queries_removed),
        "queries changed": len(changes.queries_changed),
    }
