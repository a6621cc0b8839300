"""The GO rows of the neighbours (`transfer.transfer_annotations`) are the sorted join, whether the
inputs arrive in order (joined in order, no sort) or not (sorted)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from fantasia_assets.core.transfer import HIT_SCHEMA, strictly_increasing, transfer_annotations


def _plain(hits: pl.DataFrame, annotations: pl.DataFrame, metric: str) -> pl.DataFrame:
    """The straightforward way: join, reliability index, stable sort on the output's key."""
    ri = (1.0 - pl.col("distance")) if metric == "cosine" else 0.5 / (0.5 + pl.col("distance"))
    return (
        hits.join(annotations, left_on="ref_idx", right_on="sequence_id", how="inner")
        .with_columns(ri.alias("reliability_index"))
        .sort(["accession", "rank", "protein_id", "go_id"], maintain_order=True)
    )


def _inputs(seed: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    rng = np.random.default_rng(seed)
    n_queries, k, n_refs = 60, 4, 40
    hits = pl.DataFrame(
        {
            "accession": [f"Q{q:03d}" for q in range(n_queries) for _ in range(k)],
            "query_idx": [q for q in range(n_queries) for _ in range(k)],
            "rank": [r for _ in range(n_queries) for r in range(k)],
            "ref_idx": rng.integers(0, n_refs + 5, n_queries * k),  # some without annotations
            "distance": rng.random(n_queries * k).round(2),
        },
        schema=HIT_SCHEMA,
    )
    rows = []
    for sequence in range(n_refs):
        proteins = [f"P{rng.integers(0, 10_000):05d}" for _ in range(rng.integers(1, 3))]  # shared sequences
        for protein in proteins:
            for term in sorted({f"GO:{rng.integers(0, 99):07d}" for _ in range(rng.integers(1, 6))}):
                rows.append((sequence, protein, term, "P", "an annotation"))
    annotations = pl.DataFrame(
        rows, schema=["sequence_id", "protein_id", "go_id", "category", "go_description"], orient="row"
    ).sort(["sequence_id", "protein_id", "go_id"])
    return hits, annotations


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_in_order_or_not_the_rows_are_the_sorted_join(seed, metric):
    hits, annotations = _inputs(seed)
    assert strictly_increasing(hits, ["accession", "rank"])
    assert strictly_increasing(annotations, ["sequence_id", "protein_id", "go_id"])
    variants = {
        "in order": (hits, annotations),
        "hits shuffled": (hits.sample(fraction=1.0, shuffle=True, seed=seed), annotations),
        "annotations shuffled": (hits, annotations.sample(fraction=1.0, shuffle=True, seed=seed)),
        # the database's order (sequence, protein row id, GO id) need not be the protein_id's
        "proteins of a sequence reversed": (
            hits,
            annotations.sort(["sequence_id", "protein_id", "go_id"], descending=[False, True, False]),
        ),
        "a null protein_id": (
            hits,
            annotations.with_columns(
                pl.when(pl.int_range(pl.len()) == 3)
                .then(None)
                .otherwise(pl.col("protein_id"))
                .alias("protein_id")
            ),
        ),
    }
    for name, (h, a) in variants.items():
        expected = _plain(h, a, metric)
        assert expected.height > 0
        assert transfer_annotations(h, a, metric).equals(expected), name


def test_strictly_increasing_compares_rows_lexicographically():
    frame = pl.DataFrame({"a": [1, 1, 2, 2], "b": ["x", "y", "a", "b"]})
    assert strictly_increasing(frame, ["a", "b"])
    assert not strictly_increasing(frame, ["b"])
    assert not strictly_increasing(pl.concat([frame, frame.tail(1)]), ["a", "b"])  # a repeated row
    assert not strictly_increasing(frame.with_columns(pl.lit(None, pl.String).alias("b")), ["a", "b"])
    assert strictly_increasing(frame.head(1), ["a", "b"]) and strictly_increasing(frame.head(0), ["a"])
