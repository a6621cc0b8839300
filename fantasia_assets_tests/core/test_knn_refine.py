"""Host refinement and the parallel query blocks of the k-NN engine: `exact_distances` gives, bit
for bit, the float64 values of the per-pair arithmetic it replaced; the two-step refinement's
narrowed limit (`knn_bounds.refined_limit`) holds every kept reference; and a search split among
worker threads (`knn_admission.run_blocks`) answers exactly as one block with the old refinement
does, and as the oracle."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fantasia_assets.core import knn, knn_admission, knn_reference, screen
from fantasia_assets.core.knn import METRICS, SearchEngine
from fantasia_assets.core.knn_bounds import refined_limit
from fantasia_assets_tests.conftest import shared_file
from fantasia_assets_tests.core.test_knn import read_embeddings
from fantasia_assets_tests.core.test_knn_screen import ADVERSARIAL, adversarial, exact_oracle, stressed_rows


def per_pair_distances(engine: SearchEngine, queries: np.ndarray, rows: np.ndarray, chosen: np.ndarray):
    """The refinement before `exact_distances`: float32 prepared rows widened to float64, 256
    pairs at a time, each pair's numpy einsum over freshly gathered rows."""
    out = np.empty(len(chosen))
    for start in range(0, len(chosen), 256):
        pairs = slice(start, start + 256)
        candidates = engine._references.host_rows(chosen[pairs]).astype(np.float64)
        query = queries[rows[pairs]]
        if engine.metric == "cosine":
            out[pairs] = np.clip(1.0 - np.einsum("ij,ij->i", candidates, query), 0.0, 2.0)
        else:
            candidates -= query
            out[pairs] = np.sqrt(np.einsum("ij,ij->i", candidates, candidates))
    return out


def refinement_inputs(engine: SearchEngine, queries: np.ndarray, rng: np.random.Generator):
    """(float64 refinement form of the queries, query rows, reference indices) of many pairs:
    every reference for each query, then random pairs with repeats, as refinement gets them."""
    q32 = queries.astype(np.float32)
    exact = engine._prepare_queries(q32, (q32.astype(np.float64) ** 2).sum(1))[2].numpy()
    n_q, n_ref = len(queries), engine.n_references
    rows = np.concatenate([np.repeat(np.arange(n_q), n_ref), rng.integers(0, n_q, 500)])
    chosen = np.concatenate([np.tile(np.arange(n_ref), n_q), rng.integers(0, n_ref, 500)])
    return exact, rows, chosen


def assert_bits_equal(got: np.ndarray, want: np.ndarray, label: str) -> None:
    assert got.dtype == want.dtype == np.float64, label
    np.testing.assert_array_equal(got.view(np.int64), want.view(np.int64), err_msg=label)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", [*ADVERSARIAL, "duplicated references"])
def test_exact_distances_equal_the_per_pair_arithmetic_bit_for_bit(monkeypatch, metric, name):
    """Ties, duplicates, zero vectors, huge dynamic range; float32 and float16 sources; chunks of
    one pair, of a few, and larger than the whole input."""
    rng = np.random.default_rng(len(name))
    if name == "duplicated references":
        queries = rng.standard_normal((6, 64))
        references = np.repeat(rng.standard_normal((30, 64)), 4, axis=0)
    else:
        queries, references = adversarial(name, metric, rng)
    for dtype in (np.float32, np.float16):
        with np.errstate(over="ignore"):
            fits = np.isfinite(references.astype(dtype)).all()
        if not fits:
            continue  # the huge rows do not fit float16
        engine = SearchEngine(metric, "torch", "cpu").build(references.astype(dtype))
        exact, rows, chosen = refinement_inputs(engine, queries, rng)
        want = per_pair_distances(engine, exact, rows, chosen)
        for chunk_bytes in (8 * 64, 8 * 64 * 37, 2**19):
            monkeypatch.setattr(knn_reference, "_REFINE_BYTES", chunk_bytes)
            got = engine._references.exact_distances(exact, rows, chosen)
            assert_bits_equal(got, want, f"{name} {metric} {dtype.__name__} {chunk_bytes}")
        # a pair's value depends on that pair alone: each computed by itself is the same
        alone = np.array(
            [
                engine._references.exact_distances(exact, rows[i : i + 1], chosen[i : i + 1])[0]
                for i in range(0, len(rows), 41)
            ]
        )
        assert_bits_equal(alone, want[::41], f"{name} {metric} {dtype.__name__} alone")


@pytest.mark.parametrize("metric", METRICS)
def test_exact_distances_on_real_1024_dim_rows(metric):
    """Real embeddings at 1,024 dims (the benchmark's width, 64 pairs a chunk)."""
    rng = np.random.default_rng(11)
    references = rng.standard_normal((300, 1024)) * rng.uniform(0.1, 10, (300, 1))
    queries = references[:20] + 0.05 * rng.standard_normal((20, 1024))
    engine = SearchEngine(metric, "torch", "cpu").build(references.astype(np.float16))
    exact, rows, chosen = refinement_inputs(engine, queries, rng)
    want = per_pair_distances(engine, exact, rows, chosen)
    assert_bits_equal(engine._references.exact_distances(exact, rows, chosen), want, metric)


def old_refine_on_host(self, exact_queries, indices, admissible):
    """`SearchEngine._refine_on_host` as it was before `exact_distances`."""
    rows, columns = np.nonzero(admissible)
    distances = np.full(indices.shape, np.inf, dtype=np.float32)
    distances[rows, columns] = per_pair_distances(self, exact_queries, rows, indices[rows, columns])
    return distances


@pytest.fixture(scope="module")
def real_data():
    queries = read_embeddings(shared_file("queries_mouse.h5"), 90)
    references = read_embeddings(shared_file("reference_human.h5"), 1200)
    return queries, references


@pytest.fixture
def two_workers(monkeypatch):
    """Searches of a few rows split among two worker threads, in blocks of at most 5 queries."""
    block_shape = knn_admission.block_shape
    monkeypatch.setattr(
        knn_admission, "block_shape", lambda *args: (min(10, block_shape(*args)[0]), block_shape(*args)[1])
    )
    monkeypatch.setattr(knn_admission, "_MIN_WORKER_ROWS", 4)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def search_options(queries: np.ndarray, distances: np.ndarray, n_references: int):
    """Threshold exactly at a distance, tie expansion, and exclusions of each query's nearest."""
    rng = np.random.default_rng(4)
    excluded = [np.unique([i % n_references, *rng.choice(n_references, 3)]) for i in range(len(queries))]
    indptr = np.concatenate([[0], np.cumsum([len(e) for e in excluded])])
    return [
        {},
        {"threshold": float(distances[1, 2])},
        {"tie_expansion": True},
        {"exclude": (indptr, np.concatenate(excluded))},
    ]


@pytest.mark.parametrize("metric", METRICS)
def test_workers_and_new_refinement_answer_as_one_block_and_the_old_refinement(
    real_data, two_workers, monkeypatch, metric
):
    queries, references = real_data
    engine = SearchEngine(metric, "torch", "cpu").build(references)
    if knn_admission.applies(engine):
        blocks, workers = knn_admission.query_blocks(engine, len(queries))
        assert workers == 2 and len(blocks) == 18
    expected = exact_oracle(queries, references, metric, 5)
    for options in search_options(queries, expected[0], len(references)):
        with monkeypatch.context() as patch:
            patch.setattr(knn_admission, "_MIN_WORKER_ROWS", 10**9)  # one worker
            patch.setattr(SearchEngine, "_refine_on_host", old_refine_on_host)
            want = engine.search(queries, 5, **options)
        got = engine.search(queries, 5, **options)
        assert torch.get_num_threads() == 2
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w, err_msg=f"{metric} {options}")
    for g, w in zip(engine.search(queries, 5), expected, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("name", ADVERSARIAL)
def test_workers_on_adversarial_data_equal_the_oracle(two_workers, name):
    queries, references = adversarial(name, "cosine", np.random.default_rng(len(name)))
    queries = np.vstack([queries] * 3).astype(np.float32)  # enough rows for two workers
    engine = SearchEngine("cosine", "torch", "cpu").build(references.astype(np.float32))
    for ties in (False, True):
        expected = exact_oracle(queries, references, "cosine", 5, ties=ties)
        for g, w in zip(engine.search(queries, 5, tie_expansion=ties), expected, strict=True):
            np.testing.assert_array_equal(g, w, err_msg=name)


def test_query_blocks_cover_the_queries_in_equal_rounds():
    rng = np.random.default_rng(2)
    engine = SearchEngine("cosine", "torch", "cpu", memory_budget_bytes=5 * 700 * 64).build(
        rng.standard_normal((64, 8)).astype(np.float32)
    )
    previous = torch.get_num_threads()
    try:
        for threads, n_queries in [(1, 5000), (2, 5000), (2, 300), (2, 100), (3, 1000), (2, 0)]:
            torch.set_num_threads(threads)
            blocks, workers = knn_admission.query_blocks(engine, n_queries)
            assert workers == max(1, min(threads, n_queries // knn_admission._MIN_WORKER_ROWS))
            stops = [block.stop for block in blocks]
            assert [block.start for block in blocks] == [0, *stops[:-1]][: len(blocks)]
            assert stops[-1:] == ([n_queries] if n_queries else [])
            sizes = [block.stop - block.start for block in blocks]
            assert max(sizes, default=0) - min(sizes, default=0) <= 1 and min(sizes, default=1) >= 1
            assert max(sizes, default=0) * workers <= max(700, workers)  # the budget's rows
            if workers > 1:
                assert max(sizes, default=0) <= knn_admission._MAX_WORKER_ROWS
            assert len(blocks) % workers == 0 or len(blocks) == n_queries
        torch.set_num_threads(2)  # a budget for 20,000 rows: blocks of at most 1,280 rows a worker
        engine._budget = 512 * 2**20
        blocks, workers = knn_admission.query_blocks(engine, 20000)
        assert workers == 2 and len(blocks) == 16
        assert {block.stop - block.start for block in blocks} == {1250}
    finally:
        torch.set_num_threads(previous)


def test_run_blocks_runs_workers_at_once_on_one_torch_thread_each():
    engine = SearchEngine("cosine", "torch", "cpu").build(np.eye(4, dtype=np.float32))
    both = threading.Barrier(2, timeout=30)
    previous = torch.get_num_threads()

    def run(block: slice):
        if block.start < 2:
            both.wait()  # the first two blocks run at the same time, or this times out
        return block.start, torch.get_num_threads(), engine._slots[threading.get_ident()]

    torch.set_num_threads(2)
    try:
        results = knn_admission.run_blocks(engine, [slice(i, i + 1) for i in range(6)], 2, run)
        assert [start for start, _, _ in results] == list(range(6))
        assert {threads for _, threads, _ in results} == {1}
        assert {slot for _, _, slot in results} <= {0, 1}
        assert torch.get_num_threads() == 2 and not engine._slots
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("screening", ["bf16", "fp32"] if screen.cpu_has_bf16_units() else ["fp32"])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=stressed_rows(), k=st.sampled_from([1, 3, 5]))
def test_refined_limit_holds_every_kept_reference(metric, screening, rows, k):
    """Refine any k references of smallest screened score: every reference of the answer (and
    every tie of its k-th distance) has a screened score (less its output rounding, cosine) within
    `refined_limit` of their largest refined distance."""
    queries, references = rows[:16], rows[16:]
    engine = SearchEngine(metric, "torch", "cpu", screening=screening).build(references)
    q32 = queries.astype(np.float32)
    fast, offsets, exact, coefficients = engine._prepare_queries(q32, (q32.astype(np.float64) ** 2).sum(1))
    none = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    with screen.exact_matmul_settings():
        values, indices = engine._screen(fast, none, engine.n_references)
    scores, low = np.empty(values.shape), np.empty(values.shape)
    np.put_along_axis(scores, indices.numpy(), values.numpy() + offsets[:, None], axis=1)
    rounding = screen.output_error(values, engine.arithmetic).numpy() if metric == "cosine" else 0.0
    np.put_along_axis(low, indices.numpy(), values.numpy() + offsets[:, None] - rounding, axis=1)
    n_q, n_ref = scores.shape
    pairs = np.repeat(np.arange(n_q), n_ref), np.tile(np.arange(n_ref), n_q)
    refined = engine._references.exact_distances(exact.numpy(), *pairs).astype(np.float32).reshape(n_q, n_ref)
    nearest = np.argsort(scores, axis=1, kind="stable")[:, :k]
    kth = np.take_along_axis(refined, nearest, axis=1).max(1).astype(np.float64)
    limit = refined_limit(torch.from_numpy(kth), torch.from_numpy(coefficients), metric, engine.dim).numpy()
    answer = refined <= np.sort(refined, axis=1)[:, min(k, n_ref) - 1 : min(k, n_ref)]
    assert np.all(low[answer] <= np.broadcast_to(limit[:, None], answer.shape)[answer])


def test_two_step_refinement_refines_fewer_pairs(real_data):
    """On real embeddings the refined limit is well below the screen's: fewer pairs are refined."""
    queries, references = real_data
    # pinned: auto may screen these few references in float32 (`SearchEngine._dense_limit`)
    screening = "bf16" if screen.cpu_has_bf16_units() else "auto"
    engine = SearchEngine("cosine", "torch", "cpu", screening=screening).build(references)
    refined, original = [], knn_reference.PreparedReferences.exact_distances

    def counted(self, *args):
        refined.append(len(args[2]))
        return original(self, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(knn_reference.PreparedReferences, "exact_distances", counted)
        engine.search(queries, 5)
        both = sum(refined)
        patch.setattr(knn, "refined_limit", lambda kth, *rest: torch.full_like(kth, torch.inf))
        refined.clear()
        engine.search(queries, 5)
    assert both < 0.9 * sum(refined), (both, sum(refined))


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.sampled_from([1, 2, 3, 5, 7, 17, 64, 255, 256, 1024, 1536]),
    seed=st.integers(0, 2**32 - 1),
    scale=st.integers(-30, 30),
)
def test_pairwise_row_sums_depend_on_the_row_alone(n, d, seed, scale):
    """The device refinement's sum: each row's value is the one it has summed alone, bit for
    bit, whatever the rows beside it; within the pairwise bound of the exact sum; exact where
    every partial sum is representable (small integers)."""
    rng = np.random.default_rng(seed)
    terms = rng.standard_normal((n, d)) * 2.0**scale
    sums = knn.pairwise_row_sums(torch.from_numpy(terms.copy())).numpy()
    alone = np.array([knn.pairwise_row_sums(torch.from_numpy(row[None].copy()))[0].item() for row in terms])
    assert sums.view(np.int64).tolist() == alone.view(np.int64).tolist()
    exact = np.array([math.fsum(row) for row in terms])
    levels = math.ceil(math.log2(d)) if d > 1 else 0
    bound = levels * 2.0**-53 * np.abs(terms).sum(1) * 1.0001
    assert np.all(np.abs(sums - exact) <= bound)
    integers = rng.integers(-1000, 1000, (n, d)).astype(np.float64)
    assert (
        knn.pairwise_row_sums(torch.from_numpy(integers.copy())).numpy().tolist() == integers.sum(1).tolist()
    )


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_device_refinement_is_the_same_whatever_its_step(metric, name):
    """The GPU's refinement, run here on CPU tensors: one pair a step, a few, or all at once give
    the same float32 distances bit for bit (on a card too, where there is one), within one
    float32 unit of the host refinement's (another summation order of the same float64
    products), and +inf where not admissible."""
    rng = np.random.default_rng(len(name))
    queries, references = adversarial(name, metric, rng)
    engine = SearchEngine(metric, "torch", "cpu", screening="fp32").build(references)
    q32 = queries.astype(np.float32)
    _, _, exact_queries, _ = engine._prepare_queries(q32, (q32.astype(np.float64) ** 2).sum(1))
    width = min(9, len(references))
    indices = torch.from_numpy(np.stack([rng.permutation(len(references))[:width] for _ in q32]))
    admissible = torch.from_numpy(rng.random(indices.shape) < 0.7)
    found = [engine._refine_on_device(exact_queries, indices, admissible, step) for step in (1, 3, 10**6)]
    for other in found[1:]:
        assert other.numpy().view(np.int32).tolist() == found[0].numpy().view(np.int32).tolist()
    if torch.cuda.is_available():  # element-wise IEEE operations: the card's bits are these
        card = SearchEngine(metric, "torch", "cuda", screening="fp32").build(references)
        on_card = card._refine_on_device(
            exact_queries.cuda(), indices.cuda(), admissible.cuda(), card._device_refine_pairs()
        )
        assert on_card.cpu().numpy().view(np.int32).tolist() == found[0].numpy().view(np.int32).tolist()
    host = engine._refine_on_host(exact_queries.numpy(), indices.numpy(), admissible.numpy())
    device = found[0].numpy()
    assert np.array_equal(np.isinf(device), ~admissible.numpy())
    finite = np.isfinite(host)
    np.testing.assert_array_max_ulp(device[finite], host[finite], maxulp=1)


def test_device_refinement_steps_are_large_and_fit_the_budget():
    engine = SearchEngine("cosine", "torch", "cpu", memory_budget_bytes=2**32).build(
        np.ones((4, 1024), dtype=np.float32)
    )
    assert engine._device_refine_pairs() == 2**28 // (16 * 1024)
    engine = SearchEngine("cosine", "torch", "cpu", memory_budget_bytes=2**20).build(
        np.ones((4, 1024), dtype=np.float32)
    )
    assert engine._device_refine_pairs() == knn._REFINE_PAIRS
