"""From neighbours to GO rows: one row per (neighbour × GO annotation), with its reliability index."""

from __future__ import annotations

import numpy as np
import polars as pl

ASPECTS = ("P", "F", "C")  # GO aspects: biological process, molecular function, cellular component
HIT_SCHEMA = {
    "accession": pl.String,
    "query_idx": pl.Int64,
    "rank": pl.Int32,
    "ref_idx": pl.Int64,  # the reference's sequence id: stable across runs
    "distance": pl.Float64,
}
# hits of a per-aspect search (`lookup.per_aspect`): the aspect a neighbour serves (P, F or C),
# its rank counted within that aspect; a neighbour serving several aspects has one row in each
ASPECT_HIT_SCHEMA = {
    "accession": pl.String,
    "query_idx": pl.Int64,
    "aspect": pl.String,
    "rank": pl.Int32,
    "ref_idx": pl.Int64,
    "distance": pl.Float64,
}


def reliability_index(distance: pl.Expr, metric: str) -> pl.Expr:
    """SPEC §3.7: cosine RI = 1 − d; euclidean RI = 0.5 / (0.5 + d)."""
    if metric == "cosine":
        return 1.0 - distance
    if metric == "euclidean":
        return 0.5 / (0.5 + distance)
    raise ValueError(f"unknown distance metric {metric!r}")


def aspect_masks(sequence_ids: np.ndarray, annotations: pl.DataFrame) -> np.ndarray:
    """(3, n_ref) bool in `ASPECTS` order: row j serves an aspect when reference sequence
    `sequence_ids[j]` carries an annotation (`annotations`: sequence_id, category) in it; the
    masks of a per-aspect search (`knn_aspect`).

    Annotations whose category is none of P/F/C (a GO term without namespace) serve no aspect.
    """
    ids = np.asarray(sequence_ids, dtype=np.int64)
    served = annotations.select("sequence_id", "category").unique()
    masks = np.zeros((len(ASPECTS), len(ids)), dtype=bool)
    for a, aspect in enumerate(ASPECTS):
        carriers = served.filter(pl.col("category") == aspect)["sequence_id"].to_numpy()
        masks[a] = np.isin(ids, carriers)
    return masks


def neighbour_hits(
    accessions: list[str],
    query_idx: np.ndarray,
    distances: np.ndarray,
    indices: np.ndarray,
    reference_ids: np.ndarray,
    aspect: str | None = None,
) -> pl.DataFrame:
    """Long table of the search result: one row per kept (query, neighbour).

    `distances`/`indices` are the engine's (n, K) arrays (padding: index −1); row i belongs to
    `accessions[i]` whose unique-sequence index is `query_idx[i]`. Rows come out ordered by
    query, then rank (ascending distance, ties by reference id, as the engine ordered them).
    With `aspect`, the neighbours found for that GO aspect: `ASPECT_HIT_SCHEMA`.
    """
    valid = indices >= 0
    rows, ranks = np.nonzero(valid)
    columns = {
        "accession": pl.Series(accessions, dtype=pl.String).gather(rows),
        "query_idx": np.asarray(query_idx, dtype=np.int64)[rows],
        "rank": ranks.astype(np.int32),
        "ref_idx": np.asarray(reference_ids, dtype=np.int64)[indices[valid]],
        "distance": distances[valid].astype(np.float64),
    }
    if aspect is None:
        return pl.DataFrame(columns, schema=HIT_SCHEMA)
    return pl.DataFrame({**columns, "aspect": pl.repeat(aspect, len(rows), eager=True)}).select(
        pl.col(name).cast(dtype) for name, dtype in ASPECT_HIT_SCHEMA.items()
    )


def transfer_annotations(hits: pl.DataFrame, annotations: pl.DataFrame, metric: str) -> pl.DataFrame:
    """Join hits with the annotation table on the reference sequence (SPEC §3.6-3.7).

    A sequence shared by several proteins yields each protein's annotations. Neighbours
    without any annotation yield no row. Hits of a per-aspect search (an `aspect` column)
    transfer only the annotations of the aspect each neighbour served: `category` is that
    aspect. Output ordered by accession, rank, protein, GO id.
    """
    if "aspect" in hits.columns:
        hits = hits.join(
            annotations, left_on=["ref_idx", "aspect"], right_on=["sequence_id", "category"], how="inner"
        ).rename({"aspect": "category"})
        return hits.with_columns(
            reliability_index(pl.col("distance"), metric).alias("reliability_index")
        ).sort(["accession", "rank", "protein_id", "go_id"], maintain_order=True)
    if strictly_increasing(hits, ["accession", "rank"]) and strictly_increasing(
        annotations, ["sequence_id", "protein_id", "go_id"]
    ):
        # already in order: each hit in turn, its reference's annotations in theirs (as the
        # database reads them, and the cached table keeps them); the sort below would find the
        # same order (its keys are unique), for twice the join's time
        joined = hits.join(
            annotations, left_on="ref_idx", right_on="sequence_id", how="inner", maintain_order="left_right"
        )
    else:
        joined = hits.join(annotations, left_on="ref_idx", right_on="sequence_id", how="inner").sort(
            ["accession", "rank", "protein_id", "go_id"], maintain_order=True
        )
    return joined.with_columns(reliability_index(pl.col("distance"), metric).alias("reliability_index"))


def strictly_increasing(frame: pl.DataFrame, columns: list[str]) -> bool:
    """Whether the rows' `columns` strictly increase, compared lexicographically as polars sorts
    them (a null anywhere: no); one pass, without sorting."""
    increasing = None
    for name in reversed(columns):
        column, before = pl.col(name), pl.col(name).shift(1)
        later = column > before
        increasing = later if increasing is None else later | ((column == before) & increasing)
    if frame.height < 2 or increasing is None:
        return frame.height < 2 or not columns
    return bool(frame.select(increasing.slice(1).fill_null(False).all()).item())
