"""The exact merges of `core.incremental` equal a full search, ties and thresholds included."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from fantasia_assets.core import incremental
from fantasia_assets.core.knn import SearchEngine
from fantasia_assets.core.plan import open_queries
from fantasia_assets.core.row_digests import carried_digests, row_digests
from fantasia_assets.incremental_run import query_digests, stored_query_digests
from fantasia_assets_tests.conftest import SAMPLE


def _answers(vectors, ids, queries, k, threshold, ties, metric="cosine"):
    engine = SearchEngine(metric, "torch", "cpu").build(vectors)
    names = [f"q{i}" for i in range(len(queries))]
    return incremental.search_rows(engine, ids, names, queries, k, threshold, ties, batch=7)


def _data(seed: int, metric: str):
    """References with exact duplicates (distance ties) and queries equal to some references."""
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((60, 16)).astype(np.float16)
    vectors = np.concatenate([base, base[::3], base[::5]])  # duplicated rows tie exactly
    ids = np.sort(rng.choice(10_000, size=len(vectors), replace=False)).astype(np.int64)
    queries = np.concatenate([rng.standard_normal((20, 16)), base[:10].astype(np.float32)]).astype(np.float32)
    return vectors, ids, queries


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("with_threshold", [False, True])
def test_merge_with_added_references_equals_a_full_search(metric, ties, with_threshold):
    vectors, ids, queries = _data(7, metric)
    k = 4
    full = _answers(vectors, ids, queries, k, None, ties, metric)
    # the threshold exactly at a distance that occurs, so that a pair sits on it
    threshold = float(full["distance"].sort()[len(full) // 2]) if with_threshold else None
    full = _answers(vectors, ids, queries, k, threshold, ties, metric)
    if with_threshold:
        assert (full["distance"] == threshold).any()
    rng = np.random.default_rng(1)
    added = np.zeros(len(ids), dtype=bool)
    added[rng.choice(len(ids), size=40, replace=False)] = True
    # every duplicate pair split across the two sets: new references tie old k-th neighbours
    old = _answers(vectors[~added], ids[~added], queries, k, threshold, ties, metric)
    new = _answers(vectors[added], ids[added], queries, k, threshold, ties, metric)
    merged = incremental.merge_answers(old, new, k, ties)
    order = [f"q{i}" for i in range(len(queries))]
    zero = dict.fromkeys(order, 0)
    assert incremental.assemble([merged], order, zero).equals(incremental.assemble([full], order, zero))
    # the added references searched per group under its stored k-th distances: the same merge
    for size in (1, 7, len(order)):
        groups = incremental.added_search_groups(old, order, k, threshold, size)
        assert sorted(np.concatenate([rows for rows, _ in groups]).tolist()) == list(range(len(order)))
        parts = [
            _answers(vectors[added], ids[added], queries[rows], k, limit, ties, metric).with_columns(
                pl.col("accession").replace_strict({f"q{i}": f"q{r}" for i, r in enumerate(rows.tolist())})
            )
            for rows, limit in groups
        ]
        narrowed = pl.concat(parts)
        # the group thresholds left references out (a set threshold may have left none to leave)
        assert narrowed.height < new.height or (threshold is not None and narrowed.height == new.height)
        grouped = incremental.merge_answers(old, narrowed, k, ties)
        assert incremental.assemble([grouped], order, zero).equals(incremental.assemble([full], order, zero))
    if ties:  # the case is exercised: some answers are longer than k
        assert full.group_by("accession").len()["len"].max() > k


def test_answers_without_removed_references_stay_as_stored():
    vectors, ids, queries = _data(3, "cosine")
    k = 3
    stored = _answers(vectors, ids, queries, k, None, True)
    removed = np.sort(stored["ref_idx"].unique().to_numpy()[::4])
    keep = ~np.isin(ids, removed)
    after = _answers(vectors[keep], ids[keep], queries, k, None, True)
    touched = set(stored.filter(pl.col("ref_idx").is_in(removed.tolist()))["accession"])
    assert touched and len(touched) < len(queries)
    for accession in {f"q{i}" for i in range(len(queries))} - touched:
        assert stored.filter(pl.col("accession") == accession).equals(
            after.filter(pl.col("accession") == accession)
        )


def test_tied_column_marks_the_kth_distance():
    hits = pl.DataFrame(
        {"accession": ["a"] * 4, "query_idx": [0] * 4, "rank": [0, 1, 2, 3], "ref_idx": [1, 2, 3, 4],
         "distance": [0.1, 0.2, 0.2, 0.2]},
        schema=incremental.HIT_SCHEMA,
    )  # fmt: skip
    assert incremental.tied_column(hits, 2)["tied"].to_list() == [False, True, True, True]


def test_carried_digests_equal_digesting_every_row():
    rng = np.random.default_rng(3)
    old_ids = np.array([2, 5, 7, 11, 13, 17, 19], dtype=np.int64)
    old = rng.standard_normal((len(old_ids), 8)).astype(np.float16)
    old[1, 0] = 0.0
    old[4, 2] = np.nan
    stored = pl.DataFrame(
        {"sequence_id": old_ids, "digest": row_digests(old)},
        schema={"sequence_id": pl.Int64, "digest": incremental.DIGEST},
    )
    # 7 removed, 3 and 23 added, 5 changed only in its zero's sign, 13's NaN payload changed
    keep = [0, 1, 3, 4, 5, 6]
    ids = np.array([2, 3, 5, 11, 13, 17, 19, 23], dtype=np.int64)
    new = np.concatenate([old[:1], rng.standard_normal((1, 8)), old[keep[1:]], rng.standard_normal((1, 8))])
    new = new.astype(np.float16)
    new[2, 0] = -0.0
    new.view(np.uint16)[4, 2] ^= 1
    for block in (1, 2, 100):
        carried = carried_digests(stored, old_ids, old, ids, new, block=block)
        assert carried == row_digests(new)
    # a previous matrix that is not the one the digests were taken of is never used
    assert carried_digests(stored, old_ids[:-1], old[:-1], ids, new) is None
    assert carried_digests(stored, old_ids, old.astype(np.float32), ids, new) is None


def test_query_digests_from_the_state_of_the_same_query_file():
    """With the query file the state was computed on, stored digests are taken as they are and
    only the queries the state lacks are digested; with another file, every one is digested."""
    queries = open_queries(SAMPLE / "queries.h5")
    vectors, rows, _ = queries.catalogue.read_valid((1, 0))
    plain = query_digests(queries, rows, vectors)
    accessions = [queries.catalogue.accessions[r] for r in rows.tolist()]
    marked = [b"\x00" * 16 if i == 0 else d for i, d in enumerate(plain)]  # the state's own, visibly
    stored = pl.DataFrame(
        {"accession": accessions[::2], "digest": marked[::2]},
        schema={"accession": pl.String, "digest": pl.Binary},
    )

    def state(query_hash):
        return incremental.StoredState({"query_hash": query_hash}, pl.DataFrame(), stored, pl.DataFrame())

    taken = stored_query_digests(state(queries.content_hash), queries, rows, vectors)
    assert taken[0] == b"\x00" * 16 and taken[1:] == plain[1:]
    assert stored_query_digests(state("another file"), queries, rows, vectors) == plain
