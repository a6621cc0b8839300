"""Incremental re-runs: each partition's stored neighbour state, what changed since, and exact merges.

A whole-run lookup stores, per partition, under ``experiment_path/state/{model}/{layer}/``:

- ``neighbours.parquet``: the exact answer of every searched query (the `neighbour_hits` rows:
  accession, rank, reference sequence id, float32 distance), with ``tied`` (the distance equals
  the query's k-th);
- ``queries.parquet``: accession → digest of the float32 vector searched;
- ``references.parquet``: reference sequence id → digest of its stored (float16) vector;
- ``state.json``: the format version, the code versions, the search key (metric, k,
  tie_expansion, threshold, MMseqs2 masking settings and a digest of the clusters), the
  configuration hash, the annotation version, the reference matrix fingerprint, and the
  digests of the partition's ``neighbour_hits.parquet`` and ``raw_rows.parquet`` it belongs to
  (the whole-run lookup stages the state with those outputs and publishes them together; the
  Dagster search asset writes it in place after the hits, and vouches for the hits only).

Why the stored answer is all an exact merge needs (no margin beyond k). The search keeps, per
query, the admissible references (distance ≤ threshold, not masked) ordered by (distance,
sequence id) — the matrix's rows ascend by sequence id, and ties go to the smaller row — the
first k of them, and with ``tie_expansion`` every one whose distance equals the k-th. A
reference's distance to a query depends on the two vectors only (each is normalised on its own,
refined in float64 and rounded to float32), never on the rest of the matrix. Hence:

- References added (set A): a reference x of the old set R in the answer over R ∪ A has fewer
  than k admissible predecessors in R ∪ A, so fewer than k in R: x is in R's answer (with ties:
  d_x ≤ d_k(R ∪ A) ≤ d_k(R)). The same holds for A. So the answer over R ∪ A is the selection,
  by the same rule, from the stored answer ∪ the answer of a search of the query against A alone.
- References removed: removing references that are not in a query's answer changes neither its
  first k nor its k-th distance, so its answer stays as stored. A query whose answer names a
  removed reference is searched again in full: what replaces it lies beyond the stored answer.
- A reference whose vector changed is removed, then added.
- Queries added or whose vector changed are searched in full; removed ones are dropped; the
  others keep their answers (their query index is renumbered from the new query file).
- The threshold is per pair (``distance ≤ threshold`` on the float32 distance), so it commutes
  with all of the above; a changed threshold, k, metric or tie rule changes the search key:
  full run.
- MMseqs2 masking removes, per query, the references in its cluster; clusters are computed over
  all reference and query sequences, so any sequence added or removed may move any other
  sequence's cluster. The state records a digest of the clusters: when they differ the
  partition is searched in full (never merged); when they are equal, masking is the same as it
  was, and the rules above hold over the admissible references.

Everything downstream of the neighbours (GO transfer, raw rows and shards, TopGO, summary,
predictions) is rebuilt from the merged neighbours by the same functions as a full run, so
annotation-only and output-only changes need no search at all.

The state is never trusted beyond what it proves: a missing or unreadable file, another format
or code version, another search key, or outputs that are not the ones the state was written
with (a run that failed part-way, files edited or rewritten by another writer) make the
partition run in full, with the reason logged. This module is pure: arrays and frames in, out.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from . import exports
from .digest import file_digest
from .distributed import slice_exclusions
from .plan import Partition
from .transfer import HIT_SCHEMA, neighbour_hits

STATE_FORMAT = "incremental-state-1"
STATE_ROOT = Path("state")
DIGEST = pl.Binary


class StateUnusable(Exception):
    """The stored state cannot be used for this partition; the message says why."""


class StateMissing(StateUnusable):
    """No state stored yet: the partition's first run (a full one, and nothing to warn about)."""


def state_dir(partition: Partition) -> Path:
    """The partition's state folder, relative to experiment_path."""
    return STATE_ROOT / partition.relative_dir()


def clusters_digest(clusters: Mapping[str, str] | None) -> str | None:
    """One digest of an MMseqs2 cluster map (member → representative); None without masking."""
    if clusters is None:
        return None
    digest = hashlib.blake2b(digest_size=16)
    for member, representative in sorted(clusters.items()):
        digest.update(f"{member}\t{representative}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class SearchKey:
    """What, besides the reference and query vectors, decides a partition's neighbours."""

    metric: str
    k: int
    tie_expansion: bool
    threshold: float | None
    masking: tuple[float, float] | None  # MMseqs2 (identity, coverage); None: no masking
    clusters: str | None  # `clusters_digest`
    code: str  # the search's and the package's code versions

    def as_dict(self) -> dict:
        return {
            "metric": self.metric,
            "k": self.k,
            "tie_expansion": self.tie_expansion,
            "threshold": self.threshold,
            "masking": list(self.masking) if self.masking is not None else None,
            "clusters": self.clusters,
            "code": self.code,
        }


@dataclass
class StoredState:
    meta: dict
    neighbours: pl.DataFrame  # HIT_SCHEMA + tied
    queries: pl.DataFrame  # accession, digest
    references: pl.DataFrame  # sequence_id, digest


def tied_column(hits: pl.DataFrame, k: int) -> pl.DataFrame:
    """`hits` with `tied`: the row's distance equals its query's k-th distance."""
    kth = (
        hits.filter(pl.col("rank") == k - 1)
        .select("accession", pl.col("distance").alias("_kth"))
        .unique("accession")
    )
    return (
        hits.join(kth, on="accession", how="left", maintain_order="left")
        .with_columns((pl.col("distance") == pl.col("_kth")).fill_null(False).alias("tied"))
        .drop("_kth")
    )


def write_state(
    root: Path,
    partition: Partition,
    meta: dict,
    hits: pl.DataFrame,
    k: int,
    query_accessions: list[str],
    query_digests: list[bytes],
    reference_ids: np.ndarray,
    reference_digests: list[bytes],
) -> Path:
    """Write the partition's state under `root` (experiment_path or a run's staging folder).

    `meta` must already hold the digests of the outputs it belongs to (`output_digests`); the
    JSON is written last, so a folder without it is never read as a state."""
    folder = root / state_dir(partition)
    # written in place (the Dagster asset): the old JSON goes first, so that a write stopped
    # half-way leaves no state that could be read with the new files
    (folder / "state.json").unlink(missing_ok=True)
    exports.write_parquet_atomic(folder / "neighbours.parquet", tied_column(hits, k))
    exports.write_parquet_atomic(
        folder / "queries.parquet",
        pl.DataFrame(
            {"accession": query_accessions, "digest": query_digests},
            schema={"accession": pl.String, "digest": DIGEST},
        ),
    )
    exports.write_parquet_atomic(
        folder / "references.parquet",
        pl.DataFrame(
            {"sequence_id": np.asarray(reference_ids, dtype=np.int64), "digest": reference_digests},
            schema={"sequence_id": pl.Int64, "digest": DIGEST},
        ),
    )
    exports.write_bytes_atomic(
        folder / "state.json", json.dumps({"format": STATE_FORMAT, **meta}, sort_keys=True).encode()
    )
    return folder


def output_digests(paths: Mapping[str, Path], names: tuple[str, ...] = ("hits", "raw")) -> dict[str, str]:
    """Digests of the partition outputs a state belongs to (`layout.partition_paths`' names): the
    whole-run lookup's hits and raw rows, or the hits alone (the Dagster asset that searches)."""
    return {name: file_digest(paths[name], None) for name in names}


def read_state(root: Path, partition: Partition, key: SearchKey, outputs: Mapping[str, Path]) -> StoredState:
    """The partition's stored state under `root`, checked; `StateUnusable` says why it cannot be used.

    `outputs`: the partition's current output paths (`layout.partition_paths`), whose digests must
    be those the state was written with."""
    folder = root / state_dir(partition)
    meta_path = folder / "state.json"
    if not meta_path.exists():
        raise StateMissing(f"no stored state ({meta_path})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StateUnusable(f"stored state unreadable ({meta_path}: {error})") from error
    if not isinstance(meta, dict) or meta.get("format") != STATE_FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise StateUnusable(f"stored state of another format ({found!r}, this code reads {STATE_FORMAT!r})")
    stored_key = meta.get("search_key", {})
    if stored_key.get("code") != key.code:
        raise StateUnusable(f"stored state from other code ({stored_key.get('code')!r}, now {key.code!r})")
    changed = sorted(name for name, value in key.as_dict().items() if stored_key.get(name) != value)
    if changed:
        what = "MMseqs2 clusters changed" if changed == ["clusters"] else "search settings changed"
        raise StateUnusable(f"{what}: {', '.join(changed)}")
    recorded = meta.get("outputs")
    if not isinstance(recorded, dict) or "hits" not in recorded or not set(recorded) <= set(outputs):
        raise StateUnusable(f"stored state damaged (outputs {recorded!r})")
    try:
        current = {name: file_digest(outputs[name], None) for name in recorded}
    except OSError as error:
        raise StateUnusable(f"partition outputs missing ({error})") from error
    if current != recorded:
        raise StateUnusable(
            "the partition's outputs are not the ones the state was written with "
            "(a run that failed part-way, or files rewritten since)"
        )
    try:
        neighbours = pl.read_parquet(folder / "neighbours.parquet")
        queries = pl.read_parquet(folder / "queries.parquet")
        references = pl.read_parquet(folder / "references.parquet")
    except Exception as error:  # polars/pyarrow raise many kinds for a damaged file
        raise StateUnusable(f"stored state damaged ({folder}: {error})") from error
    expected = {
        "neighbours": (neighbours, {**HIT_SCHEMA, "tied": pl.Boolean}),
        "queries": (queries, {"accession": pl.String, "digest": DIGEST}),
        "references": (references, {"sequence_id": pl.Int64, "digest": DIGEST}),
    }
    for name, (frame, schema) in expected.items():
        if dict(frame.schema) != schema:
            raise StateUnusable(f"stored state damaged ({name}.parquet has columns {dict(frame.schema)})")
    ids = references["sequence_id"].to_numpy()
    if len(ids) > 1 and not (np.diff(ids) > 0).all():
        raise StateUnusable("stored state damaged (reference ids not strictly ascending)")
    return StoredState(meta, neighbours.drop("tied"), queries, references)


@dataclass
class Changes:
    """What changed in one partition since its stored state."""

    references_added: np.ndarray  # sequence ids, ascending
    references_removed: np.ndarray
    references_changed: np.ndarray
    queries_added: list[str]
    queries_removed: list[str]
    queries_changed: list[str]
    annotations: bool
    settings: bool  # a configuration change that leaves the search as it was

    def kinds(self) -> list[str]:
        """The kinds of change, in the issue's words; empty when nothing changed."""
        named = [
            ("references added", len(self.references_added)),
            ("references removed", len(self.references_removed)),
            ("references changed", len(self.references_changed)),
            ("queries added", len(self.queries_added)),
            ("queries removed", len(self.queries_removed)),
            ("queries changed", len(self.queries_changed)),
            ("annotations", self.annotations),
            ("output settings", self.settings),
        ]
        return [name for name, present in named if present]


def diff(
    state: StoredState,
    reference_ids: np.ndarray,
    reference_digests: list[bytes],
    query_accessions: list[str],
    query_digests: list[bytes],
    annotation_version: str | None,
    config_hash: str,
) -> Changes:
    """Compare the stored state with the current references, queries, annotations (None: not
    known to the caller, the Dagster search asset) and settings."""
    old_refs = state.references
    new_refs = pl.DataFrame(
        {"sequence_id": np.asarray(reference_ids, dtype=np.int64), "new": reference_digests},
        schema={"sequence_id": pl.Int64, "new": DIGEST},
    )
    joined = old_refs.join(new_refs, on="sequence_id", how="full", coalesce=True)
    added = joined.filter(pl.col("digest").is_null())["sequence_id"].sort().to_numpy()
    removed = joined.filter(pl.col("new").is_null())["sequence_id"].sort().to_numpy()
    changed = joined.filter(pl.col("digest") != pl.col("new"))["sequence_id"].sort().to_numpy()
    new_queries = pl.DataFrame(
        {"accession": query_accessions, "new": query_digests}, schema={"accession": pl.String, "new": DIGEST}
    )
    q = state.queries.join(new_queries, on="accession", how="full", coalesce=True)
    return Changes(
        added,
        removed,
        changed,
        q.filter(pl.col("digest").is_null())["accession"].sort().to_list(),
        q.filter(pl.col("new").is_null())["accession"].sort().to_list(),
        q.filter(pl.col("digest") != pl.col("new"))["accession"].sort().to_list(),
        annotation_version is not None and state.meta.get("annotation_version") != annotation_version,
        state.meta.get("config_hash") != config_hash,
    )


def queries_to_search(state: StoredState, changes: Changes) -> list[str]:
    """Accessions whose answer must be searched in full: added or changed queries, and the kept
    ones whose stored answer names a removed or changed reference."""
    gone = np.concatenate([changes.references_removed, changes.references_changed])
    touched = (
        state.neighbours.filter(pl.col("ref_idx").is_in(gone.tolist()))["accession"].unique().to_list()
        if len(gone)
        else []
    )
    return sorted(set(changes.queries_added) | set(changes.queries_changed) | set(touched))


def search_rows(
    engine,
    reference_ids: np.ndarray,
    accessions: list[str],
    vectors: np.ndarray,
    k: int,
    threshold: float | None,
    tie_expansion: bool,
    batch: int,
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
) -> pl.DataFrame:
    """The answers (HIT_SCHEMA, `query_idx` left 0) of `vectors` in the engine's matrix (a built
    `knn.SearchEngine` or `knn_numpy.NumpySearchEngine`: the same answers), whose row
    i is `reference_ids[i]`: the same call, batch by batch, as the full search makes. `exclude`:
    the MMseqs2 mask as CSR over these rows (`redundancy.exclusion_csr`)."""
    parts = []
    for start in range(0, len(vectors), batch):
        stop = min(start + batch, len(vectors))
        distances, indices = engine.search(
            vectors[start:stop],
            k,
            threshold=threshold,
            exclude=slice_exclusions(exclude, start, stop),
            tie_expansion=tie_expansion,
        )
        parts.append(
            neighbour_hits(accessions[start:stop], np.zeros(stop - start), distances, indices, reference_ids)
        )
    return pl.concat(parts) if parts else pl.DataFrame(schema=HIT_SCHEMA)


def added_search_groups(
    stored: pl.DataFrame, accessions: list[str], k: int, threshold: float | None, size: int
) -> list[tuple[np.ndarray, float | None]]:
    """Groups of at most `size` positions in `accessions` (queries whose `stored` answer is merged
    with a search of the added references alone), each with the threshold that search may use.

    A reference x of the added set A enters a query's answer over R ∪ A only if d_x ≤ d_k(R ∪ A)
    ≤ d_k(R), the k-th stored distance (`merge_answers`' reasoning); every reference of A before
    it in (distance, sequence id) order is then within that distance too, so x is also in A's
    answer under any threshold t' ≥ d_k(R), and a merge over a subset of the admissible
    references that holds the answer selects the answer. So each group is searched with
    t' = min(threshold, the largest d_k(R) in it), or `threshold` when one of its queries has
    fewer than k stored neighbours. Queries are grouped by ascending d_k(R), which keeps each
    group's t' tight: the search refines only the few added references that can enter."""
    kth = stored.filter(pl.col("rank") == k - 1).select("accession", "distance")
    bound = (
        pl.DataFrame({"accession": accessions}, schema={"accession": pl.String})
        .join(kth, on="accession", how="left", maintain_order="left")["distance"]
        .cast(pl.Float64)
        .fill_null(np.inf)
        .to_numpy()
    )
    order = np.argsort(bound, kind="stable")
    groups = []
    for start in range(0, len(order), size):
        rows = np.sort(order[start : start + size])
        limit = float(bound[rows].max())
        if not math.isfinite(limit):
            groups.append((rows, threshold))
        else:
            groups.append((rows, limit if threshold is None else min(threshold, limit)))
    return groups


def merge_answers(stored: pl.DataFrame, added: pl.DataFrame, k: int, tie_expansion: bool) -> pl.DataFrame:
    """Per accession, the answer over the union of two disjoint reference sets from each set's
    answer: ordered by (distance, sequence id), the first k, and with `tie_expansion` every one
    whose distance equals the k-th (the full search's rule, `core.knn`). Ranks renumbered."""
    both = pl.concat([stored.select(list(HIT_SCHEMA)), added.select(list(HIT_SCHEMA))])
    ranked = both.sort("accession", "distance", "ref_idx").with_columns(
        (pl.int_range(pl.len()).over("accession")).cast(pl.Int32).alias("rank")
    )
    if not tie_expansion:
        return ranked.filter(pl.col("rank") < k)
    kth = ranked.filter(pl.col("rank") == k - 1).select("accession", pl.col("distance").alias("_kth"))
    kept = ranked.join(kth, on="accession", how="left", maintain_order="left").filter(
        (pl.col("rank") < k) | (pl.col("distance") <= pl.col("_kth"))
    )
    return kept.drop("_kth")


def assemble(answers: list[pl.DataFrame], order: list[str], query_idx: Mapping[str, int]) -> pl.DataFrame:
    """One hits table as the full search writes it: queries in search `order`, then by rank, with
    `query_idx` from the current query file."""
    positions = pl.DataFrame(
        {"accession": order, "_pos": np.arange(len(order)), "_qi": [query_idx[a] for a in order]},
        schema={"accession": pl.String, "_pos": pl.Int64, "_qi": pl.Int64},
    )
    frames = [a.select(list(HIT_SCHEMA)) for a in answers if a.height]
    hits = pl.concat(frames) if frames else pl.DataFrame(schema=HIT_SCHEMA)
    return (
        hits.join(positions, on="accession", how="inner")
        .sort("_pos", "rank")
        .with_columns(pl.col("_qi").alias("query_idx"))
        .select(list(HIT_SCHEMA))
    )


@dataclass
class Update:
    """What one partition's run did: ``kind`` "full" (with ``reason``), "unchanged" or the change
    kinds joined by " + "; how many queries were searched in full and merged with added rows."""

    kind: str
    reason: str | None = None
    searched: int = 0
    merged: int = 0
    details: dict = field(default_factory=dict)
