"""The per-aspect search (one screen, three masks) against a float64 brute-force oracle per aspect
and against the plain engine with every reference outside the aspect excluded: real masks from
the shared annotations, then adversarial ties, thresholds, exclusions and tiny blocks."""

from __future__ import annotations

import h5py
import numpy as np
import polars as pl
import pytest

from fantasia_assets.core import screen
from fantasia_assets.core.knn import BACKENDS, METRICS, SearchEngine
from fantasia_assets.core.knn_aspect import search_by_aspect
from fantasia_assets.core.transfer import ASPECTS, aspect_masks
from fantasia_assets_tests.conftest import shared_file
from fantasia_assets_tests.core.test_knn import assert_matches_oracle, assert_ordered, oracle_distances

N_QUERIES, N_REFERENCES = 200, 3000


def masked_out(masks: np.ndarray, n_queries: int, exclude=None):
    """The exclusion CSR that removes every reference outside each mask (plus `exclude`'s)."""
    per_mask = []
    for mask in masks:
        outside = np.flatnonzero(~mask)
        rows = [outside] * n_queries
        if exclude is not None:
            indptr, refs = exclude
            rows = [np.union1d(outside, refs[indptr[i] : indptr[i + 1]]) for i in range(n_queries)]
        indptr = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
        per_mask.append((indptr, np.concatenate(rows).astype(np.int64)))
    return per_mask


def assert_same_as_plain(engine, masks, queries, k, **options):
    """search_by_aspect gives, per mask, exactly what the plain engine gives with the rest excluded."""
    exclude = options.pop("exclude", None)
    found = search_by_aspect(engine, masks, queries, k, exclude=exclude, **options)
    assert len(found) == len(masks)
    for (distances, indices), plain_exclude in zip(
        found, masked_out(masks, len(queries), exclude), strict=True
    ):
        plain = engine.search(queries, k, exclude=plain_exclude, **options)
        assert np.array_equal(distances, plain[0]) and np.array_equal(indices, plain[1])
        assert_ordered(distances, indices)
    return found


@pytest.fixture(scope="module")
def real_data():
    """Mouse queries, human references and each reference's real aspects (shared annotations)."""
    with h5py.File(shared_file("queries_mouse.h5")) as handle:
        names = sorted(handle.keys())[:N_QUERIES]
        queries = np.stack([handle[f"{n}/type_1/layer_0/embedding"][()] for n in names])
    with h5py.File(shared_file("reference_human.h5")) as handle:
        names = sorted(handle.keys())[:N_REFERENCES]
        references = np.stack([handle[f"{n}/type_1/layer_0/embedding"][()] for n in names])
    accessions = [n[len("accession_") :] for n in names]
    table = pl.read_csv(shared_file("annotations_human_mouse.tsv.gz"), separator="\t", columns=[0, 3])
    annotations = table.join(
        pl.DataFrame({"accession": accessions, "sequence_id": np.arange(len(accessions))}), on="accession"
    ).select("sequence_id", pl.col("aspect").alias("category"))
    masks = aspect_masks(np.arange(len(accessions)), annotations)
    return queries, references, masks


def test_real_masks_are_partial(real_data):
    _, _, masks = real_data
    counts = masks.sum(1)
    assert masks.shape == (3, N_REFERENCES) and np.all(counts > 100) and np.all(counts < N_REFERENCES)


@pytest.mark.parametrize("metric", METRICS)
def test_real_data_matches_the_oracle_per_aspect_on_every_backend(real_data, metric):
    queries, references, masks = real_data
    oracle = oracle_distances(queries, references, metric)
    results = []
    for backend in BACKENDS:
        engine = SearchEngine(metric, backend).build(references)
        found = assert_same_as_plain(engine, masks, queries, 5)
        for (distances, indices), mask in zip(found, masks, strict=True):
            assert mask[indices].all()
            assert_matches_oracle(distances, indices, np.where(mask, oracle, np.inf), 5, metric)
        results.append(found)
    for found in results[1:]:
        for (d, i), (d0, i0) in zip(found, results[0], strict=True):
            assert np.array_equal(d, d0) and np.array_equal(i, i0)


@pytest.mark.skipif(not screen.cpu_has_bf16_units(), reason="no bfloat16 matrix units on this CPU")
@pytest.mark.parametrize("metric", METRICS)
def test_bf16_screen_gives_the_fp32_answer_per_aspect(real_data, metric):
    queries, references, masks = real_data
    fp32 = search_by_aspect(
        SearchEngine(metric, "torch", screening="fp32").build(references), masks, queries, 5
    )
    bf16 = search_by_aspect(
        SearchEngine(metric, "torch", screening="bf16").build(references), masks, queries, 5
    )
    for (d, i), (d0, i0) in zip(bf16, fp32, strict=True):
        assert np.array_equal(d, d0) and np.array_equal(i, i0)


@pytest.mark.parametrize("metric", METRICS)
def test_threshold_exclusions_and_small_blocks_per_aspect(real_data, metric):
    queries, references, masks = real_data
    queries = queries[:60]
    oracle = oracle_distances(queries, references, metric)
    threshold = float(np.median(np.sort(oracle, axis=1)[:, 3]))
    rng = np.random.default_rng(5)
    nearest = np.argsort(oracle, axis=1, kind="stable")[:, :4]
    excluded = [np.unique([*nearest[i], *rng.choice(N_REFERENCES, i % 7)]) for i in range(60)]
    indptr = np.concatenate([[0], np.cumsum([len(e) for e in excluded])]).astype(np.int64)
    exclude = (indptr, np.concatenate(excluded).astype(np.int64))
    for backend in BACKENDS:
        engine = SearchEngine(metric, backend, memory_budget_bytes=200_000).build(references)
        found = assert_same_as_plain(engine, masks, queries, 5, threshold=threshold, exclude=exclude)
        kept = sum(int((i >= 0).sum()) for _, i in found)
        assert 0 < kept < 3 * 5 * 60  # the threshold cut some rows short
        for (distances, indices), mask in zip(found, masks, strict=True):
            assert not any(set(indices[i]) & set(excluded[i]) for i in range(60))
            assert np.all(distances[indices >= 0] <= threshold)
            assert mask[indices[indices >= 0]].all()


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_adversarial_ties_inside_and_outside_the_masks(metric, backend):
    """Twelve exact twins of a query's neighbour, spread over the masks: ties resolve by index
    within each aspect and tie expansion keeps every twin of the aspect; twins outside a mask
    never appear in it; a mask with fewer references than k and an empty mask pad with -1."""
    rng = np.random.default_rng(7)
    references = rng.standard_normal((300, 16)).astype(np.float32)
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    twins = np.array([5, 12, 40, 41, 77, 90, 101, 130, 150, 160, 170, 299])
    references[twins] = queries[0] + 0.05 * rng.standard_normal(16).astype(np.float32)
    references[200:260] = references[200]  # a block of identical references: a tie of 60
    masks = np.zeros((4, 300), dtype=bool)
    masks[0, ::2] = True  # even rows: twins 12, 40, 90, 130, 150, 160, 170 and the tie block's evens
    masks[1, twins[:3]] = True  # three twins and nothing else: fewer references than k = 5
    masks[2] = True
    engine = SearchEngine(metric, backend).build(references)
    for ties in (False, True):
        found = assert_same_as_plain(engine, masks, queries, 5, tie_expansion=ties)
        even, few, everything, empty = found
        expected_even = [t for t in twins if t % 2 == 0]
        assert (
            even[1][0, : len(expected_even) if ties else 5].tolist() == expected_even[: None if ties else 5]
        )
        assert few[1][0].tolist()[:5] == [5, 12, 40, -1, -1]
        assert everything[1][0, : len(twins) if ties else 5].tolist() == twins[: None if ties else 5].tolist()
        assert np.all(empty[1] == -1) and np.all(np.isinf(empty[0]))
    tied = references[200] + 1e-3  # a query next to the tie block: expansion keeps all of its members
    found = assert_same_as_plain(engine, masks[[0, 2]], tied[None, :], 2, tie_expansion=True)
    assert found[0][1][0].tolist()[:30] == list(range(200, 260, 2))
    assert found[1][1][0].tolist()[:60] == list(range(200, 260))


def test_aspect_masks_read_the_categories():
    annotations = pl.DataFrame(
        {"sequence_id": [10, 10, 11, 13, 13, 14], "category": ["P", "F", "C", "P", None, "undefined"]}
    )
    masks = aspect_masks(np.array([13, 10, 11, 12, 14]), annotations)
    assert ASPECTS == ("P", "F", "C")
    assert masks.tolist() == [
        [True, True, False, False, False],
        [False, True, False, False, False],
        [False, False, True, False, False],
    ]


def test_bad_masks_are_refused():
    engine = SearchEngine("cosine", "numpy").build(np.eye(4, dtype=np.float32))
    with pytest.raises(ValueError, match="masks must be boolean"):
        search_by_aspect(engine, np.ones((3, 5), dtype=bool), np.eye(4, dtype=np.float32), 2)
    with pytest.raises(ValueError, match="masks must be boolean"):
        search_by_aspect(engine, np.ones((3, 4)), np.eye(4, dtype=np.float32), 2)


def test_per_aspect_search_is_refused_on_a_cluster_and_without_annotations():
    from fantasia_assets.core.plan import LookupPlanError
    from fantasia_assets.core.stages import SearchSettings, search_partition

    settings = SearchSettings(per_aspect=True)
    with pytest.raises(LookupPlanError, match=r"lookup\.per_aspect runs in the lookup's process only"):
        search_partition(
            None, None, None, settings, batch_search=lambda *_: iter(()), annotations=pl.DataFrame()
        )
    with pytest.raises(ValueError, match="needs the reference annotations"):
        search_partition(None, None, None, settings)
