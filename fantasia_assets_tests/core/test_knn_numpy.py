"""The numpy-only engine of small searches equals the exact oracle, its screen never errs beyond
its bound, and small CPU searches run without importing torch."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fantasia_assets.core.knn_numpy import SMALL_SEARCH_FLOPS, NumpySearchEngine, engine_for, smallest_columns
from fantasia_assets_tests.conftest import PROJECT, shared_file
from fantasia_assets_tests.core.test_knn import read_embeddings
from fantasia_assets_tests.core.test_knn_screen import ADVERSARIAL, adversarial, exact_oracle, stressed_rows

METRICS = ("cosine", "euclidean")


def assert_equals_oracle(queries, references, metric, k, **options):
    expected = exact_oracle(
        queries, references, metric, k, options.get("threshold"), options.get("tie_expansion", False)
    )
    distances, indices = NumpySearchEngine(metric).build(references).search(queries, k, **options)
    np.testing.assert_array_equal(indices, expected[1], err_msg=f"{metric} indices")
    np.testing.assert_array_equal(distances, expected[0], err_msg=f"{metric} distances")


@pytest.fixture(scope="module")
def real_data():
    queries = read_embeddings(shared_file("queries_mouse.h5"), 200)
    references = read_embeddings(shared_file("reference_human.h5"), 2000)
    return queries, references


@pytest.mark.parametrize("metric", METRICS)
def test_real_data_equals_the_exact_oracle(real_data, metric):
    queries, references = real_data
    assert_equals_oracle(queries, references, metric, 10)
    assert_equals_oracle(queries, references.astype(np.float16), metric, 5)


@pytest.mark.parametrize("metric", METRICS)
def test_real_data_threshold_ties_and_exclusions(real_data, metric):
    queries, references = real_data
    queries = queries[:60]
    first = exact_oracle(queries, references, metric, 3)[0]
    assert_equals_oracle(queries, references, metric, 5, threshold=float(first[7, 2]))
    twins = np.repeat(references[:50], 3, axis=0)
    assert_equals_oracle(queries, twins, metric, 4, tie_expansion=True)
    # every query loses its three nearest references, and query 0 every reference
    nearest = exact_oracle(queries, references, metric, 3)[1]
    lists = [np.arange(len(references))] + [row for row in nearest[1:]]
    indptr = np.concatenate([[0], np.cumsum([len(row) for row in lists])])
    exclude = (indptr, np.concatenate(lists))
    found = NumpySearchEngine(metric).build(references).search(queries, 5, exclude=exclude)
    assert (found[1][0] == -1).all() and np.isinf(found[0][0]).all()
    for row in range(1, len(queries)):
        kept = np.setdiff1d(np.arange(len(references)), nearest[row])
        expected = exact_oracle(queries[row : row + 1], references[kept], metric, 5)
        np.testing.assert_array_equal(found[1][row], kept[expected[1][0]])
        np.testing.assert_array_equal(found[0][row], expected[0][0])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_data_equals_the_exact_oracle(name, metric):
    queries, references = adversarial(name, metric, np.random.default_rng(len(name)))
    queries, references = queries.astype(np.float32), references.astype(np.float32)
    assert_equals_oracle(queries, references, metric, 5)
    assert_equals_oracle(queries, references, metric, 5, tie_expansion=True)
    distances = exact_oracle(queries, references, metric, 5)[0]
    at_a_distance = float(distances[np.isfinite(distances)].max())
    assert_equals_oracle(queries, references, metric, 5, threshold=at_a_distance)


@pytest.mark.parametrize("metric", METRICS)
def test_antipodal_and_model_sized_rows(metric):
    """Cosine distances at 2 (refinement clips there) and 1,024-d rows with large offsets."""
    rng = np.random.default_rng(3)
    references = rng.standard_normal((300, 1024)).astype(np.float32)
    queries = np.vstack([-references[:5], 30 + references[5:10]]).astype(np.float32)
    references[10:20] += 30
    assert_equals_oracle(queries, references, metric, 7)
    assert_equals_oracle(queries, references, metric, 7, tie_expansion=True)


def test_tiny_memory_budget_changes_nothing(real_data):
    queries, references = real_data
    whole = NumpySearchEngine("cosine").build(references).search(queries[:50], 5)
    engine = NumpySearchEngine("cosine", memory_budget_bytes=100_000).build(references)
    assert engine._block_rows(50) < 5
    blocked = engine.search(queries[:50], 5)
    assert np.array_equal(whole[0], blocked[0]) and np.array_equal(whole[1], blocked[1])


def screened_errors(engine: NumpySearchEngine, queries: np.ndarray):
    """(|s̃ - T| (b, n_ref), δ (b, 1)): the engine's own screen of every reference against the
    target in extended precision."""
    q32 = queries.astype(np.float32)
    sq_norms = (q32.astype(np.float64) ** 2).sum(1)
    operands, offsets, _, deltas = engine._query_forms(q32, sq_norms)
    no_exclusions = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    values, indices = engine._screen(operands, no_exclusions, engine.n_references)
    scores = np.empty(values.shape)
    np.put_along_axis(scores, indices, values + offsets[:, None], axis=1)
    q, r = q32.astype(np.longdouble), engine._reference.astype(np.longdouble)
    if engine.metric == "cosine":
        norms = np.sqrt((q * q).sum(1, keepdims=True))
        target = 1 - np.divide(q, norms, out=np.zeros_like(q), where=norms > 0) @ r.T
    else:
        target = np.stack([((row - r) ** 2).sum(1) for row in q])
    return np.abs(scores - target).astype(np.float64), deltas[:, None]


@pytest.mark.parametrize("metric", METRICS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=stressed_rows())
def test_screen_error_never_exceeds_its_bound(metric, rows):
    engine = NumpySearchEngine(metric).build(rows[16:])
    errors, bound = screened_errors(engine, rows[:16])
    assert np.all(errors <= bound), float((errors / np.maximum(bound, 1e-300)).max())


def test_the_bound_is_tight_on_real_data(real_data):
    """Cosine δ is a few float32 units times √n, not a loose constant: the first screen of
    k + 8 candidates settles every real query."""
    queries, references = real_data
    engine = NumpySearchEngine("cosine").build(references)
    _, bound = screened_errors(engine, queries[:20])
    assert bound.max() < 2.0**-14
    screens = []
    original = engine._screen
    engine._screen = lambda *args: screens.append((len(args[0]), args[2])) or original(*args)
    engine.search(queries, 5)
    assert screens == [(len(queries), 13)]


def test_engine_choice():
    small = ("cosine", "torch", "cpu", "auto", 1500, 13000, 256)
    assert SMALL_SEARCH_FLOPS >= 2 * 1500 * 13000 * 256
    if "torch" not in sys.modules:
        assert isinstance(engine_for(*small), NumpySearchEngine)
    # a million references searched by 10 queries: few FLOPs, but 4 GiB in float32
    for changed in ({3: "bf16"}, {2: "cuda"}, {1: "scipy"}, {4: 200_000}, {4: 10, 5: 1_000_000, 6: 1024}):
        arguments = list(small)
        for position, value in changed.items():
            arguments[position] = value
        if arguments[2] == "cuda":
            continue  # a CUDA engine needs a GPU to be built; the choice is what is tested
        assert not isinstance(engine_for(*arguments), NumpySearchEngine)


def test_a_small_search_stage_never_imports_torch(tmp_path):
    """The whole search stage of a small partition, in a fresh process: torch stays unloaded,
    and the neighbours equal the torch engine's."""
    script = tmp_path / "stage.py"
    script.write_text(
        "import sys\n"
        "import numpy as np\n"
        "from fantasia_assets.core.stages import SearchSettings, in_process_search\n"
        "from fantasia_assets.core.plan import ModelSpec, Partition\n"
        "from fantasia_assets.core.references import ReferenceMatrix, ReferenceScope\n"
        "rng = np.random.default_rng(0)\n"
        "refs = rng.standard_normal((500, 32)).astype(np.float16)\n"
        "queries = rng.standard_normal((40, 32)).astype(np.float32)\n"
        "matrix = ReferenceMatrix(ReferenceScope(1, 0), np.arange(1, 501), refs, 'f')\n"
        "partition = Partition(ModelSpec('M', None, None, (0,)), 1, 0)\n"
        "search = in_process_search(matrix, SearchSettings(device='cpu'), partition)\n"
        "(_, (distances, indices)), = search(queries, None, 100)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "from fantasia_assets.core.knn import SearchEngine\n"
        "expected = SearchEngine('cosine', 'torch', 'cpu').build(refs).search(queries, 5)\n"
        "assert np.array_equal(distances, expected[0]) and np.array_equal(indices, expected[1])\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(PROJECT)}
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, env=environment, timeout=120
    )
    assert done.returncode == 0, done.stderr


@given(
    values=st.lists(st.integers(-3, 3), min_size=1, max_size=2000).map(np.array),
    count=st.integers(1, 12),
)
@settings(max_examples=60, deadline=None)
def test_two_stage_selection_keeps_the_smallest_values(values, count):
    rows = np.tile(values, (3, 1)).astype(np.float32)
    rows[1] = rows[1][::-1]
    count = min(count, rows.shape[1])
    picked = smallest_columns(rows, count)
    assert all(len(set(row)) == count for row in picked.tolist())
    expected = np.sort(rows, axis=1)[:, :count]
    np.testing.assert_array_equal(np.sort(np.take_along_axis(rows, picked, axis=1), axis=1), expected)


@pytest.mark.parametrize("width", [13_000, 12_999, 4_096 + 31])
def test_two_stage_selection_on_wide_rows_equals_a_full_partition(width):
    """The groups' minima (one reduction over a view) and the members gathered by flat position
    keep the `count` smallest values of each row, as a partition of the whole row does; also on
    a column slice (a view whose rows are not contiguous) and with ties and infinities."""
    rng = np.random.default_rng(width)
    values = rng.standard_normal((40, width + 7)).astype(np.float32)
    values[::3, ::5] = np.round(values[::3, ::5])  # ties
    values[1, :50] = np.inf  # excluded references
    for matrix in (np.ascontiguousarray(values[:, :width]), values[:, :width]):
        for count in (1, 5, 13, 40):
            picked = smallest_columns(matrix, count)
            assert all(len(set(row)) == count for row in picked.tolist())
            chosen = np.sort(np.take_along_axis(matrix, picked, axis=1), axis=1)
            np.testing.assert_array_equal(
                chosen, np.sort(np.partition(matrix, count - 1, axis=1)[:, :count], axis=1)
            )


def test_available_memory_is_psutils_figure():
    """The budget's figure, read from /proc/meminfo, is the one psutil gives (MemAvailable)."""
    import psutil

    from fantasia_assets.core.knn_inputs import available_memory

    # memory moves between the two reads: equal up to what other processes did meanwhile
    assert abs(available_memory() - psutil.virtual_memory().available) < 256 * 2**20


def test_a_timeline_shows_the_engine_import_and_build_inside_the_search(monkeypatch):
    """A cold run's timeline (`bench/lookup.py --timeline`) parts the search stage: the engine's
    import, then its build; a search that reuses the kept engine builds nothing."""
    from fantasia_assets.core import timing
    from fantasia_assets.core.plan import ModelSpec, Partition
    from fantasia_assets.core.references import ReferenceMatrix, ReferenceScope
    from fantasia_assets.core.stages import SearchSettings, in_process_search

    rng = np.random.default_rng(1)
    refs = rng.standard_normal((300, 16)).astype(np.float16)
    queries = rng.standard_normal((20, 16)).astype(np.float32)
    matrix = ReferenceMatrix(ReferenceScope(1, 0), np.arange(1, 301), refs, "f")
    partition = Partition(ModelSpec("M", None, None, (0,)), 1, 0)
    import torch  # noqa: F401  (imported: `engine_for` picks knn's engine, whose build has parts)

    # float32: a pinned bf16 screen would be refused on a CPU without bf16 units
    settings = SearchSettings(device="cpu", screening="fp32")
    spans: list = []
    monkeypatch.setattr(timing, "TIMELINE", spans)
    list(in_process_search(matrix, settings, partition)(queries, None, 100))
    names = [name for name, *_ in spans]
    assert names == [
        timing.PART + "engine: import",
        timing.PART + "engine: screen chosen",
        timing.PART + "engine: references prepared",
        timing.PART + "engine: build",
    ]
    build, chosen, prepared = spans[3], spans[1], spans[2]
    assert build[2] <= chosen[2] <= chosen[3] <= prepared[2] <= prepared[3] <= build[3]
    spans.clear()
    list(in_process_search(matrix, settings, partition)(queries, None, 100))  # the kept engine
    assert [name for name, *_ in spans] == [timing.PART + "engine: import"]
