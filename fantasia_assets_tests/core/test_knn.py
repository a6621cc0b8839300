"""The exact k-NN engine against an independent float64 brute-force oracle, real and synthetic."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from fantasia_assets.core.knn import BACKENDS, METRICS, SearchEngine
from fantasia_assets_tests.conftest import shared_file

N_QUERIES, N_REFERENCES = 300, 3000
TIE = 1e-6  # oracle distances closer than this count as tied: either order is right
TOLERANCE = {"cosine": {"atol": 1e-5, "rtol": 0}, "euclidean": {"atol": 0, "rtol": 1e-4}}


def oracle_distances(queries: np.ndarray, references: np.ndarray, metric: str) -> np.ndarray:
    """Full (n_q, n_ref) distance matrix in float64, straight from the definitions."""
    q, r = queries.astype(np.float64), references.astype(np.float64)
    if metric == "cosine":
        return np.clip(1.0 - unit_rows(q) @ unit_rows(r).T, 0.0, 2.0)
    chunks = (q[i : i + 16, None, :] - r[None] for i in range(0, len(q), 16))
    return np.concatenate([np.sqrt((difference**2).sum(-1)) for difference in chunks])


def unit_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to norm 1; zero rows stay zero (cosine distance 1 to everything)."""
    norm = np.linalg.norm(matrix, axis=1, keepdims=True)
    return np.divide(matrix, norm, out=np.zeros_like(matrix), where=norm > 0)


def oracle_order(distances: np.ndarray) -> np.ndarray:
    """Reference indices of each row by (distance, index): a stable sort keeps ties by index."""
    return np.argsort(distances, axis=1, kind="stable")


def assert_matches_oracle(distances, indices, oracle, k, metric):
    """Same distances as the oracle's top-k, and the same indices wherever the oracle has no tie."""
    order = oracle_order(oracle)[:, : k + 1]
    ranked = np.take_along_axis(oracle, order, axis=1)
    assert distances.dtype == np.float32 and indices.dtype == np.int64
    assert distances.shape == indices.shape == (len(oracle), k)
    np.testing.assert_allclose(distances, ranked[:, :k], **TOLERANCE[metric])
    own = np.take_along_axis(oracle, indices, axis=1)
    np.testing.assert_allclose(distances, own, **TOLERANCE[metric])
    gaps = np.diff(ranked, axis=1) >= TIE  # gaps[:, j]: rank j is clearly before rank j + 1
    untied = gaps.copy()
    untied[:, 1:] &= gaps[:, :-1]
    assert np.array_equal(indices[untied], order[:, :k][untied])
    assert all(len(set(row)) == k for row in indices)


def assert_ordered(distances, indices):
    """Ascending (distance, index) within every row."""
    later_index = (indices[:, 1:] > indices[:, :-1]) | (indices[:, 1:] == -1)
    equal = distances[:, 1:] == distances[:, :-1]
    assert ((distances[:, 1:] > distances[:, :-1]) | (equal & later_index)).all()


def read_embeddings(path, count: int, layer: int = 0) -> np.ndarray:
    with h5py.File(path) as handle:
        names = sorted(handle.keys())[:count]
        return np.stack([handle[f"{name}/type_1/layer_{layer}/embedding"][()] for name in names])


@pytest.fixture(scope="module")
def real_data():
    """300 mouse queries and 3,000 human references (256-d), with the oracle for both metrics."""
    queries = read_embeddings(shared_file("queries_mouse.h5"), N_QUERIES)
    references = read_embeddings(shared_file("reference_human.h5"), N_REFERENCES)
    oracle = {metric: oracle_distances(queries, references, metric) for metric in METRICS}
    return queries, references, oracle


@pytest.mark.parametrize("metric", METRICS)
def test_real_data_every_backend_matches_oracle_identically(real_data, metric):
    queries, references, oracle = real_data
    results = []
    for backend in BACKENDS:
        distances, indices = SearchEngine(metric, backend).build(references).search(queries, 10)
        assert_matches_oracle(distances, indices, oracle[metric], 10, metric)
        assert_ordered(distances, indices)
        results.append((distances, indices))
    for distances, indices in results[1:]:
        assert np.array_equal(distances, results[0][0]) and np.array_equal(indices, results[0][1])


@pytest.mark.parametrize("metric", METRICS)
def test_float16_references_are_widened(real_data, metric):
    queries, references, _ = real_data
    half = references.astype(np.float16)  # as the database's halfvec stores them
    oracle = oracle_distances(queries, half, metric)
    for backend in ("torch", "numpy"):
        engine = SearchEngine(metric, backend).build(half)
        assert_matches_oracle(*engine.search(queries, 5), oracle, 5, metric)


@pytest.mark.parametrize("metric", METRICS)
def test_tiny_memory_budget_uses_many_blocks_and_changes_nothing(real_data, metric):
    queries, references, _ = real_data
    for backend in BACKENDS:
        whole = SearchEngine(metric, backend).build(references).search(queries[:100], 5)
        engine = SearchEngine(metric, backend, memory_budget_bytes=60_000).build(references)
        assert engine._block_shape(100)[1] < N_REFERENCES // 10
        blocked = engine.search(queries[:100], 5)
        assert np.array_equal(whole[0], blocked[0]) and np.array_equal(whole[1], blocked[1])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dim", [1024, 1536])
@pytest.mark.parametrize("offset", [0.0, 30.0])
def test_model_sized_dimensions(metric, dim, offset):
    """Offset 30 gives large norms and small differences, where ‖q‖² + ‖r‖² - 2q·r cancels."""
    rng = np.random.default_rng(dim)
    references = (offset + rng.standard_normal((400, dim))).astype(np.float32)
    queries = (offset + rng.standard_normal((12, dim))).astype(np.float32)
    near_duplicates = queries[:11] + 1e-3 * rng.standard_normal((11, dim))
    references[::37] = near_duplicates
    oracle = oracle_distances(queries, references, metric)
    for backend in BACKENDS:
        found = SearchEngine(metric, backend).build(references).search(queries, 7)
        assert_matches_oracle(*found, oracle, 7, metric)


@pytest.mark.parametrize("backend", BACKENDS)
def test_euclidean_neighbours_closer_than_the_fast_formulas_error(backend):
    """Spacing 0.001 under norms of ~1,000: ‖q‖² + ‖r‖² - 2q·r in float32 ranks these at random,
    so only a margin that provably contains the answer (then refinement) finds them."""
    rng = np.random.default_rng(11)
    query = (30 + rng.standard_normal((1, 1024))).astype(np.float32)
    directions = rng.standard_normal((400, 1024))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    steps = 0.001 * (1 + rng.permutation(400))[:, None]
    references = (query + steps * directions).astype(np.float32)
    oracle = oracle_distances(query, references, "euclidean")
    distances, indices = SearchEngine("euclidean", backend).build(references).search(query, 10)
    assert_matches_oracle(distances, indices, oracle, 10, "euclidean")


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_duplicated_references_tie_by_index_and_expand(metric, backend):
    rng = np.random.default_rng(7)
    references = rng.standard_normal((200, 16)).astype(np.float32)
    queries = rng.standard_normal((2, 16)).astype(np.float32)
    twins = [5, 12, 40, 41, 77, 90, 101, 130, 150, 160, 170, 199]  # more than k + the first margin
    references[twins] = queries[0] + 0.05 * rng.standard_normal(16).astype(np.float32)
    engine = SearchEngine(metric, backend).build(references)

    distances, indices = engine.search(queries, 2)
    assert indices[0].tolist() == [5, 12] and distances[0, 0] == distances[0, 1]

    distances, indices = engine.search(queries, 2, tie_expansion=True)
    assert distances.shape == (2, len(twins))
    assert indices[0].tolist() == twins and np.all(distances[0] == distances[0, 0])
    assert np.all(indices[1, 2:] == -1) and np.all(np.isinf(distances[1, 2:]))
    oracle = oracle_distances(queries[1:], references, metric)
    assert_matches_oracle(distances[1:, :2], indices[1:, :2], oracle, 2, metric)


def test_tie_expansion_keeps_k_columns_without_ties(real_data):
    queries, references, oracle = real_data
    engine = SearchEngine("cosine", "numpy").build(references)
    distances, indices = engine.search(queries, 3, tie_expansion=True)
    assert_matches_oracle(distances, indices, oracle["cosine"], 3, "cosine")


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_threshold_pads_rows_with_inf_and_minus_one(real_data, metric, backend):
    queries, references, oracle = real_data
    ranked = np.sort(oracle[metric], axis=1)[:, :5]
    threshold = float(np.median(ranked[:, 2]))
    engine = SearchEngine(metric, backend).build(references)
    distances, indices = engine.search(queries, 5, threshold=threshold)
    kept = indices >= 0
    assert np.array_equal(kept.sum(1), (ranked <= threshold).sum(1))
    assert 0 < kept.sum() < kept.size
    assert np.all(kept[:, :-1] >= kept[:, 1:])  # padding only at the end of a row
    assert np.all(distances[kept] <= threshold) and np.all(np.isinf(distances[~kept]))
    np.testing.assert_allclose(distances[kept], ranked[kept], **TOLERANCE[metric])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_excluded_references_are_removed_before_top_k(real_data, metric, backend):
    queries, references, oracle = real_data
    queries, oracle = queries[:60], oracle[metric][:60]
    rng = np.random.default_rng(3)
    nearest = oracle_order(oracle)[:, :3]
    excluded = [np.unique([*nearest[i], *rng.choice(N_REFERENCES, i % 5)]) for i in range(60)]
    indptr = np.concatenate([[0], np.cumsum([len(e) for e in excluded])]).astype(np.int64)
    masked = oracle.copy()
    for i, refs in enumerate(excluded):
        masked[i, refs] = np.inf
    engine = SearchEngine(metric, backend, memory_budget_bytes=1_000_000).build(references)
    distances, indices = engine.search(queries, 5, exclude=(indptr, np.concatenate(excluded)))
    assert not any(set(indices[i]) & set(excluded[i]) for i in range(60))
    assert_matches_oracle(distances, indices, masked, 5, metric)


def test_fewer_references_than_k_and_excluding_everything():
    references = np.eye(3, 8, dtype=np.float32)
    engine = SearchEngine("euclidean", "torch").build(references)
    exclude = (np.array([0, 0, 3]), np.array([0, 1, 2]))  # query 1 excludes every reference
    distances, indices = engine.search(references[:2], 5, exclude=exclude)
    assert indices[0].tolist() == [0, 1, 2, -1, -1] and distances[0, 0] == 0
    assert indices[1].tolist() == [-1] * 5 and np.all(np.isinf(distances[1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_norm_vectors_have_cosine_distance_one(backend):
    references = np.random.default_rng(1).standard_normal((20, 8)).astype(np.float32)
    references[3] = 0
    queries = np.stack([np.zeros(8, np.float32), -references[3 + 1]])
    distances, indices = SearchEngine("cosine", backend).build(references).search(queries, 4)
    assert indices[0].tolist() == [0, 1, 2, 3] and np.all(distances[0] == 1.0)
    full = SearchEngine("cosine", backend).build(references).search(queries[1:], 20)
    assert full[0][0, full[1][0].tolist().index(3)] == 1.0
    assert full[0][0, -1] == pytest.approx(2.0, abs=1e-6)


def test_queries_in_float64_are_accepted(real_data):
    queries, references, oracle = real_data
    engine = SearchEngine("euclidean", "torch").build(references)
    distances, indices = engine.search(queries.astype(np.float64), 4)
    assert_matches_oracle(distances, indices, oracle["euclidean"], 4, "euclidean")


def test_invalid_arguments_raise_value_errors():
    references = np.ones((4, 8), dtype=np.float32)
    with pytest.raises(ValueError, match="unknown metric"):
        SearchEngine("manhattan")
    with pytest.raises(ValueError, match="unknown backend"):
        SearchEngine(backend="faiss")
    with pytest.raises(ValueError, match="empty"):
        SearchEngine().build(np.zeros((0, 8), dtype=np.float32))
    with pytest.raises(ValueError, match="2-D"):
        SearchEngine().build(np.ones(8, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN"):
        SearchEngine().build(np.full((2, 8), np.nan, dtype=np.float32))
    with pytest.raises(ValueError, match="CPU"):
        SearchEngine(backend="numpy", device="cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            SearchEngine(device="cuda")
    with pytest.raises(RuntimeError, match="build"):
        SearchEngine().search(references, 1)
    engine = SearchEngine().build(references)
    with pytest.raises(ValueError, match=r"\(n_q, 8\)"):
        engine.search(np.ones((2, 7), dtype=np.float32), 1)
    for k in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="k must be"):
            engine.search(references, k)
    for threshold in (-0.1, float("nan")):
        with pytest.raises(ValueError, match="threshold"):
            engine.search(references, 1, threshold=threshold)
    with pytest.raises(ValueError, match="indptr"):
        engine.search(references, 1, exclude=(np.array([0, 1]), np.array([0])))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        engine.search(references, 1, exclude=(np.array([0, 1, 1, 1, 1]), np.array([4])))
    assert engine.n_references == 4 and engine.dim == 8
