"""The 16-bit screen: every engine equals an exact oracle on real and adversarial data, and the
screen's error never exceeds the bound `knn_bounds` derives."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fantasia_assets.config import ConfigError, parse_config
from fantasia_assets.core import knn_admission, screen, units
from fantasia_assets.core.knn import METRICS, SearchEngine
from fantasia_assets.core.knn_bounds import UNIT, screened_enough
from fantasia_assets_tests.conftest import shared_file
from fantasia_assets_tests.core.test_knn import read_embeddings

BF16 = pytest.mark.skipif(
    not screen.cpu_has_bf16_units(), reason="this CPU has no AMX-BF16 or AVX512-BF16 units"
)


def engines(metric: str = "cosine"):
    """(backend, device, screening) of every engine this machine runs for `metric`: the 16-bit
    screens on each device it has (CUDA's choice of bf16 or fp16 is the card's), the int8 screen
    (cosine, CPU), and the float32 screens."""
    found = [("torch", "cpu", "fp32"), ("numpy", "cpu", "fp32"), ("scipy", "cpu", "fp32")]
    if metric == "cosine" and screen.int8_sums_exactly():
        found.insert(0, ("torch", "cpu", "int8"))
    if screen.cpu_has_bf16_units():
        found.insert(0, ("torch", "cpu", "bf16"))
    if torch.cuda.is_available():
        found.append(("torch", "cuda", "auto"))
    return found


def exact_oracle(queries, references, metric, k, threshold=None, ties=False):
    """The answer by definition (SPEC §3.3): float64 distances of the float32 rows, rounded to
    float32, ordered by (distance, index); cosine against references normalised in float32."""
    q = queries.astype(np.float32).astype(np.float64)
    r32 = references.astype(np.float32)
    if metric == "cosine":
        norms = np.sqrt((q * q).sum(1, keepdims=True))
        q_unit = np.divide(q, norms, out=np.zeros_like(q), where=norms > 0)
        r_norms = np.sqrt((r32.astype(np.float64) ** 2).sum(1))
        inverse = np.divide(1.0, r_norms, out=np.zeros_like(r_norms), where=r_norms > 0)
        r_unit = (r32 * inverse.astype(np.float32)[:, None]).astype(np.float64)
        distances = np.clip(1.0 - q_unit @ r_unit.T, 0.0, 2.0)
    else:
        r = r32.astype(np.float64)
        distances = np.stack([np.sqrt(((row - r) ** 2).sum(1)) for row in q])
    distances = distances.astype(np.float32)
    rows = []
    for row in distances:
        order = np.lexsort((np.arange(len(row)), row))
        kept = order[:k]
        if ties and len(order) >= k:
            kept = order[row[order] <= row[order[k - 1]]]
        if threshold is not None:
            kept = kept[row[kept].astype(np.float64) <= threshold]
        rows.append((row[kept], kept))
    width = max([k] + [len(kept) for _, kept in rows])
    out_d = np.full((len(rows), width), np.inf, dtype=np.float32)
    out_i = np.full((len(rows), width), -1, dtype=np.int64)
    for i, (d, kept) in enumerate(rows):
        out_d[i, : len(kept)], out_i[i, : len(kept)] = d, kept
    return out_d, out_i


def assert_every_engine_equals_oracle(queries, references, metric, k, **options):
    expected = exact_oracle(
        queries, references, metric, k, options.get("threshold"), options.get("tie_expansion", False)
    )
    for backend, device, screening in engines(metric):
        engine = SearchEngine(metric, backend, device, screening=screening).build(references)
        assert screening == "auto" or engine.screening == screening
        label = f"{backend} {device} {engine.screening}"
        distances, indices = engine.search(queries, k, **options)
        np.testing.assert_array_equal(indices, expected[1], err_msg=f"{label} {metric} indices")
        np.testing.assert_array_equal(distances, expected[0], err_msg=f"{label} {metric} distances")


@pytest.fixture(scope="module")
def real_data():
    queries = read_embeddings(shared_file("queries_mouse.h5"), 200)
    references = read_embeddings(shared_file("reference_human.h5"), 2000)
    return queries, references


@pytest.mark.parametrize("metric", METRICS)
def test_real_data_every_engine_equals_the_exact_oracle(real_data, metric):
    queries, references = real_data
    assert_every_engine_equals_oracle(queries, references, metric, 10)
    assert_every_engine_equals_oracle(queries, references.astype(np.float16), metric, 5)


@pytest.mark.parametrize("metric", METRICS)
def test_real_data_threshold_ties_and_exclusions(real_data, metric):
    queries, references = real_data
    queries = queries[:60]
    first = exact_oracle(queries, references, metric, 3)[0]
    threshold = float(first[7, 2])  # exactly a distance of the answer: it must be kept
    assert_every_engine_equals_oracle(queries, references, metric, 5, threshold=threshold)
    twins = np.repeat(references[:50], 3, axis=0)  # every reference three times: exact ties
    assert_every_engine_equals_oracle(queries, twins, metric, 4, tie_expansion=True)


def adversarial(name: str, metric: str, rng: np.random.Generator):
    """(queries, references) built to stress the screen's window and its bound."""
    dim = 64
    if name == "exact ties":  # 6 distinct rows, each repeated: whole rows of equal distances
        references = np.repeat(rng.standard_normal((6, dim)), 40, axis=0)
        return rng.standard_normal((8, dim)), rng.permutation(references)
    if name == "ties within 1e-6":  # distances to the query differ by ~1e-7 relative
        query = rng.standard_normal((1, dim))
        references = query + 0.3 * rng.standard_normal((1, dim)) + 3e-8 * rng.standard_normal((300, dim))
        return np.vstack([query, references[:3]]), references
    if name == "huge dynamic range":  # components from 1e-26 to 1e12, rows over 12 decades
        scale = 10.0 ** rng.uniform(-20, 6, (1, dim)) * 10.0 ** rng.uniform(-6, 6, (240, 1))
        references = rng.standard_normal((240, dim)) * scale
        return references[:10] * (1 + 1e-3 * rng.standard_normal((10, dim))), references
    if name == "zero vectors":
        references = rng.standard_normal((200, dim))
        references[::7] = 0
        queries = rng.standard_normal((6, dim))
        queries[0] = 0
        queries[1] = references[8]
        return queries, references
    if name == "k above the reference count":
        return rng.standard_normal((5, dim)), rng.standard_normal((3, dim))
    raise ValueError(name)


ADVERSARIAL = [
    "exact ties",
    "ties within 1e-6",
    "huge dynamic range",
    "zero vectors",
    "k above the reference count",
]


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_adversarial_data_every_engine_equals_the_exact_oracle(name, metric):
    queries, references = adversarial(name, metric, np.random.default_rng(len(name)))
    queries, references = queries.astype(np.float32), references.astype(np.float32)
    assert_every_engine_equals_oracle(queries, references, metric, 5)
    assert_every_engine_equals_oracle(queries, references, metric, 5, tie_expansion=True)
    distances = exact_oracle(queries, references, metric, 5)[0]
    at_a_distance = float(distances[np.isfinite(distances)].max())
    assert_every_engine_equals_oracle(queries, references, metric, 5, threshold=at_a_distance)


def screened_errors(engine: SearchEngine, queries: np.ndarray, references: np.ndarray):
    """(|s̃ - T| (b, n_ref), its bound (b, n_ref)) over every reference, from the engine's own screen
    and an extended-precision oracle of the target T (`knn_bounds`)."""
    q32 = queries.astype(np.float32)
    sq_norms = (q32.astype(np.float64) ** 2).sum(1)
    fast, offsets, _, coefficients = engine._prepare_queries(q32, sq_norms)
    no_exclusions = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    with screen.exact_matmul_settings():
        values, indices = engine._screen(fast, no_exclusions, engine.n_references)
    scores, rounding = np.empty(values.shape), np.empty(values.shape)
    np.put_along_axis(scores, indices.cpu().numpy(), (values.cpu().numpy() + offsets[:, None]), axis=1)
    # cosine: each score's output rounding is bounded per score (`knn_bounds`, item 4)
    per_score = screen.output_error(values, engine.arithmetic).cpu().numpy()
    np.put_along_axis(rounding, indices.cpu().numpy(), per_score, axis=1)
    reference = engine._references.prepared(0, engine.n_references).cpu().numpy()
    q, r = q32.astype(np.longdouble), reference.astype(np.longdouble)
    if engine.metric == "cosine":
        norms = np.sqrt((q * q).sum(1, keepdims=True))
        unit = np.divide(q, norms, out=np.zeros_like(q), where=norms > 0)
        target = 1 - unit @ r.T
        bound = coefficients[:, :1] + rounding
    else:
        target = np.stack([((row - r) ** 2).sum(1) for row in q])
        a, b, c, z = (coefficients[:, i : i + 1] for i in range(4))
        root = z + np.sqrt(target.astype(np.float64))
        bound = a + b * root + c * root**2
    return np.abs(scores - target.astype(np.float64)), bound


@st.composite
def stressed_rows(draw):
    """Rows from a few generators: plain, offset (cancelling euclidean products), wide exponent
    ranges, zeros and duplicates."""
    dim = draw(st.sampled_from([1, 3, 17, 64, 256]))
    seed = draw(st.integers(0, 2**32 - 1))
    kind = draw(st.sampled_from(["plain", "offset", "range", "zeros", "twins"]))
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((48, dim))
    if kind == "offset":
        matrix += draw(st.floats(-1e4, 1e4))
    elif kind == "range":
        matrix *= 10.0 ** rng.uniform(-12, 3, (48, dim))
    elif kind == "zeros":
        matrix[rng.random((48, dim)) < 0.5] = 0
        matrix[::5] = 0
    elif kind == "twins":
        matrix[24:] = matrix[:24] * (1 + 1e-7 * rng.standard_normal((24, dim)))
    matrix *= 2.0 ** draw(st.integers(-60, 20))
    return matrix.astype(np.float32)


@BF16
@pytest.mark.parametrize("metric", METRICS)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=stressed_rows())
def test_bf16_screen_error_never_exceeds_its_bound(metric, rows):
    engine = SearchEngine(metric, "torch", "cpu", screening="bf16").build(rows[16:])
    errors, bound = screened_errors(engine, rows[:16], rows[16:])
    assert np.all(errors <= bound), float((errors / np.maximum(bound, 1e-300)).max())


@pytest.mark.parametrize("metric", METRICS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=stressed_rows())
def test_fp32_screen_error_never_exceeds_its_bound(metric, rows):
    engine = SearchEngine(metric, "torch", "cpu", screening="fp32").build(rows[16:])
    errors, bound = screened_errors(engine, rows[:16], rows[16:])
    assert np.all(errors <= bound)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=stressed_rows())
def test_int8_screen_error_never_exceeds_its_bound(rows):
    """The int8 screen's scaled integer products (`screen.int8_product`) against the bound, on the
    same stressed rows: wide exponent ranges put most components of a row below its 127 levels."""
    engine = SearchEngine("cosine", "torch", "cpu", screening="int8").build(rows[16:])
    errors, bound = screened_errors(engine, rows[:16], rows[16:])
    assert np.all(errors <= bound), float((errors / np.maximum(bound, 1e-300)).max())


def test_int8_operands_round_trip_and_refuse_what_they_cannot_sum():
    """Operands stay within ±127 and stand for values·scale with the residual measured; a zero row
    stays zero; dimensions beyond exact int32 sums, other backends, devices and metrics are
    refused, naming the setting."""
    rng = np.random.default_rng(4)
    rows = (rng.standard_normal((40, 33)) * 10.0 ** rng.uniform(-8, 8, (40, 1))).astype(np.float32)
    rows[3] = 0
    operands, stats = screen.to_operands(torch.from_numpy(rows), screen.INT8)
    values = operands.values.numpy().astype(np.float64)
    assert np.abs(values).max() <= 127 and np.all(values[3] == 0)
    assert np.all(np.abs(values).max(1)[np.arange(40) != 3] >= 126)  # the levels are used
    rebuilt = values * operands.scale.numpy().astype(np.float64)[:, None]
    residual = np.sqrt(((rows.astype(np.float64) - rebuilt) ** 2).sum(1))
    np.testing.assert_allclose(stats["residual"], residual, rtol=1e-12, atol=0)
    assert np.all(stats["residual"] <= 0.5 * operands.scale.numpy() * np.sqrt(33) * (1 + 1e-6))
    for backend, device, metric in (("numpy", "cpu", "cosine"), ("torch", "cpu", "euclidean")):
        with pytest.raises(screen.ScreeningError, match="'int8'"):
            screen.resolve_screening("int8", backend, torch.device(device), metric)
    with pytest.raises(screen.ScreeningError, match="133144 dimensions"):
        SearchEngine("cosine", "torch", "cpu", screening="int8").build(np.ones((2, 133145), np.float32))


@pytest.mark.skipif(not screen.int8_sums_exactly(), reason="this CPU's int8 product does not sum exactly")
def test_int8_window_on_real_data_stays_a_few_dozen_candidates(real_data):
    """The int8 bound is wider than bf16's (coarser operands), but on real 256-d neighbourhoods the
    admission screen still keeps a few dozen candidates per row and proves every row itself."""
    queries, references = real_data
    engine = SearchEngine("cosine", "torch", "cpu", screening="int8").build(references)
    q32 = queries.astype(np.float32)
    fast, _, _, bounds = engine._prepare_queries(q32, (q32.astype(np.float64) ** 2).sum(1))
    none = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    with screen.exact_matmul_settings(), knn_admission.single_threaded():
        values, _, kept = knn_admission.screen(engine, fast, torch.from_numpy(bounds), none, 5, None, 1)
    assert len(kept) == len(queries)
    assert float(np.median(bounds[:, 0])) < 2.0**-5
    assert float(np.isfinite(values.numpy()).sum(1).mean()) < 60


@BF16
def test_bf16_bound_is_tight_enough_to_screen_few_candidates(real_data):
    """On real embeddings the window stays narrow: the cosine bound is a few 2⁻⁹, far from the
    distances' range, the admission screen keeps a few dozen candidates per row and leaves no
    row to the top-m screen, and the top-m screen (euclidean) settles all but a few rows with
    its first k + 32 candidates."""
    queries, references = real_data
    engine = SearchEngine("cosine", "torch", "cpu", screening="bf16").build(references)
    _, bound = screened_errors(engine, queries[:50], references)
    assert 2.0**-9 < bound.max() < 6 * 2.0**-9
    admitted, screens = [], []
    original_admission = knn_admission.screen
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            knn_admission, "screen", lambda *args: admitted.append(original_admission(*args)) or admitted[-1]
        )
        original = engine._screen
        engine._screen = lambda *args: screens.append((len(args[0]), args[2])) or original(*args)
        engine.search(queries, 5)
    values, _, rows = admitted[0]
    assert len(rows) == len(queries) and not screens
    assert np.isfinite(values.numpy()).sum(1).mean() < 64
    engine = SearchEngine("euclidean", "torch", "cpu", screening="bf16").build(references)
    original = engine._screen
    engine._screen = lambda *args: screens.append((len(args[0]), args[2])) or original(*args)
    engine.search(queries, 5)
    assert screens[0] == (len(queries), 37) and sum(rows for rows, _ in screens[1:]) <= len(queries) // 20


@given(
    values=st.lists(st.integers(-3, 3), min_size=1, max_size=2000).map(np.array),
    count=st.integers(1, 12),
)
@settings(max_examples=80, deadline=None)
def test_two_stage_selection_keeps_the_smallest_values(values, count):
    rows = torch.from_numpy(np.tile(values, (3, 1))).float()
    rows[1] = rows[1].flip(0)
    count = min(count, rows.shape[1])
    picked = screen.smallest_columns(rows, count)
    assert all(len(set(row)) == count for row in picked.tolist())
    expected = rows.sort(dim=1).values[:, :count]
    assert torch.equal(rows.gather(1, picked).sort(dim=1).values, expected)


def test_screening_choices_and_errors():
    with pytest.raises(ValueError, match="unknown screening"):
        SearchEngine(screening="fp8")
    engine = SearchEngine("cosine", "numpy", screening="auto").build(np.eye(4, dtype=np.float32))
    assert engine.screening == "fp32"
    with pytest.raises(screen.ScreeningError, match="backend 'torch'"):
        SearchEngine("cosine", "scipy", screening="bf16").build(np.eye(4, dtype=np.float32))
    engine = SearchEngine("cosine", "torch", "cpu", screening="fp32").build(np.eye(4, dtype=np.float32))
    assert engine.screening == "fp32"
    with pytest.raises(ValueError, match="2\\^56"):
        SearchEngine("euclidean", "numpy").build(np.full((2, 4), 2.0**60, dtype=np.float32))
    base = {"experiment_path": "x", "embeddings_path": "y.h5", "embedding": {"models": {"M": {}}}}
    assert parse_config(base).screening == "auto"
    assert parse_config({**base, "lookup": {"screening": "bf16"}}).screening == "bf16"
    with pytest.raises(ConfigError, match=r"lookup\.screening"):
        parse_config({**base, "lookup": {"screening": "fp16"}})


@pytest.mark.parametrize("threshold", [2.0, 2.5, None])
def test_cosine_limit_covers_clipped_distances(threshold):
    """A refined cosine distance clipped to 2 hides targets up to 1 + ‖r̂‖ ≤ 2 + 2.1u: with
    D* = 2 (a threshold ≥ 2, or a k-th screened score near 2) the limit must reach past them."""
    a = 1e-3
    coefficients = torch.tensor([[a, 0.0, 0.0, 0.0]], dtype=torch.float64)
    scores = torch.tensor([[1.99, 2.0 - a, 2.0]], dtype=torch.float64)
    limit = screened_enough(scores, 3, coefficients, threshold, "cosine", 1024)[1]
    assert float(limit[0]) - a >= 2 + 2.1 * UNIT


def test_the_start_up_probe_counts_only_its_own_cpu_time(monkeypatch):
    """The probe runs beside threads that hold the interpreter lock and the cores: time the
    product's thread spends off the CPU must not count. A bfloat16 product that also sleeps
    50 ms (a stand-in for waiting on the lock or the scheduler) keeps the measured speedup above
    0.5; in wall time it would be float32's 2-10 ms over bfloat16's time plus 50 ms, below 0.2.
    Not "where it was": on a CPU with AMX the product after a sleep restores the tile state and
    runs on cold caches, which thread time rightly counts (measured 8.9 quiet, 3.5 after sleeps,
    on a loaded 2-core Xeon). The probe leaves torch's thread count as it found it."""
    threads = torch.get_num_threads()
    quiet = units.probe_speedup()
    real_mm = torch.mm

    def waiting_mm(a, b, *args, **kwargs):
        if a.dtype == torch.bfloat16:
            time.sleep(0.05)
        return real_mm(a, b, *args, **kwargs)

    monkeypatch.setattr(torch, "mm", waiting_mm)
    waited = units.probe_speedup()
    assert torch.get_num_threads() == threads
    assert 0.5 < waited < quiet * 2, (quiet, waited)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_operands_skip_the_flush_pass_only_where_it_changes_nothing(dtype):
    """`to_operands` flushes operands below the smallest normal; a chunk with no input that small
    skips the pass. Both kinds of chunk give the operands and statistics of the full pass."""
    arithmetic = screen.Arithmetic(
        screen._NAMES[dtype], dtype, 2.0**-22, 2.0**-8, screen._SMALLEST_NORMAL[dtype]
    )
    rng = np.random.default_rng(5)
    normal = torch.from_numpy(rng.standard_normal((3, 64)).astype(np.float32))
    tiny = normal.clone()
    tiny[0, :4] = torch.tensor([0.0, -0.0, 1e-40, -(2.0**-130)])
    tiny[1, :2] = torch.tensor([arithmetic.smallest_normal * 0.999, -arithmetic.smallest_normal * 1.001])
    for rows in (normal, tiny):
        operands, stats = screen.to_operands(rows, arithmetic)
        full = rows.to(dtype)
        full.masked_fill_(full.abs() < arithmetic.smallest_normal, 0)
        assert torch.equal(operands.view(torch.int16), full.view(torch.int16))
        wide = full.float()
        np.testing.assert_array_equal(stats["residual"], screen.row_norms(rows - wide))
        np.testing.assert_array_equal(stats["operand_norm"], screen.row_norms(wide))


def unit_references(references: np.ndarray) -> torch.Tensor:
    """The engine's stored unit references r̂_j (float32) of `references`."""
    engine = SearchEngine("cosine", "torch", "cpu", screening="fp32").build(references)
    return engine._references.prepared(0, len(references))


def unit_reference_norms(unit: torch.Tensor, dtype: torch.dtype) -> tuple[np.ndarray, np.ndarray]:
    """(‖r̂_j‖, ‖ỹ_j‖) measured in float64 for unit references r̂_j and their operands ỹ_j in
    `dtype` (subnormals zeroed), as the bound defines them."""
    operand = unit.to(dtype)
    if dtype != torch.float32:
        operand.masked_fill_(operand.abs() < screen._SMALLEST_NORMAL[dtype], 0)
    return screen.row_norms(unit), screen.row_norms(operand.float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", [*ADVERSARIAL, "subnormal components"])
def test_cosine_reference_norm_bounds_hold_where_they_replace_measurement(name, dtype):
    """For cosine references `to_operands` takes ‖r̂_j‖ ≤ 1 + 2.1u and ‖ỹ_j‖ ≤ that + ‖e_j‖ instead
    of measuring them (`knn_bounds`): each bound is at least the norm measured in float64, on
    rows of huge range, zeros, ties and rows whose unit form has subnormal components; the
    residuals are still the measured ones."""
    rng = np.random.default_rng(len(name))
    if name == "subnormal components":
        references = rng.standard_normal((40, 64))
        references[:, :8] *= 1e-42  # far below float32's and bfloat16's smallest normal once unit
    else:
        references = adversarial(name, "cosine", rng)[1]
    references = references.astype(np.float32)
    arithmetic = screen.FP32 if dtype == torch.float32 else screen.Arithmetic(
        screen._NAMES[dtype], dtype, 2.0**-22, screen._OUTPUT_UNIT[dtype], screen._SMALLEST_NORMAL[dtype]
    )  # fmt: skip
    unit = unit_references(references)
    _, stats = screen.to_operands(unit.clone(), arithmetic, unit_rows=True)
    _, measured = screen.to_operands(unit.clone(), arithmetic)  # every norm measured, as before
    norms, operand_norms = unit_reference_norms(unit, dtype)
    np.testing.assert_array_equal(measured["norm"], norms)
    np.testing.assert_array_equal(measured["operand_norm"], operand_norms)
    assert (stats["norm"] == screen.UNIT_ROW_NORM).all() and norms.max() <= screen.UNIT_ROW_NORM
    assert (stats["operand_norm"] >= operand_norms).all()
    np.testing.assert_array_equal(stats["residual"], measured["residual"])
    # the bound is looser by a hair, not by a factor: the window the screen keeps hardly widens
    assert stats["operand_norm"].max() <= operand_norms.max() + stats["residual"].max() + 1e-6


@given(stressed_rows())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_cosine_reference_norm_bounds_hold_on_random_rows(references):
    unit = unit_references(references)
    for dtype in (torch.bfloat16, torch.float16):
        arithmetic = screen.Arithmetic(
            screen._NAMES[dtype], dtype, 2.0**-22, screen._OUTPUT_UNIT[dtype], screen._SMALLEST_NORMAL[dtype]
        )
        _, stats = screen.to_operands(unit.clone(), arithmetic, unit_rows=True)
        norms, operand_norms = unit_reference_norms(unit, dtype)
        assert norms.max() <= screen.UNIT_ROW_NORM
        assert (stats["operand_norm"] >= operand_norms).all()


HALF_OUTPUTS = [
    screen.Arithmetic(
        screen._NAMES[dtype], dtype, 2.0**-22, screen._OUTPUT_UNIT[dtype], screen._SMALLEST_NORMAL[dtype]
    )
    for dtype in (torch.bfloat16, torch.float16)
]


@pytest.mark.parametrize("arithmetic", HALF_OUTPUTS, ids=lambda a: a.name)
def test_output_error_bounds_the_rounding_of_every_product(arithmetic):
    """`screen.output_error` (`knn_bounds`, item 4): float32 results rounded to the 16-bit output
    type move by at most h(x) of the rounded x, on values spread over the whole exponent range,
    just around every binade boundary (where x = 2^e may come from below it), in the subnormal
    range and at zero, of both signs; and h is 0 for a float32 output and for ±inf."""
    rng = np.random.default_rng(7)
    low = -150 if arithmetic.dtype == torch.bfloat16 else -27
    spread = rng.standard_normal(400_000) * 2.0 ** rng.uniform(low, 15, 400_000)
    exponents = np.arange(low, 15, dtype=np.float64)
    edges = np.concatenate(
        [2.0**exponents * (1 + f) for f in (-(2.0**-9), -(2.0**-12), 0.0, 2.0**-12, 2.0**-9)]
    )
    values = np.concatenate([spread, edges, -edges, [0.0, -0.0]]).astype(np.float32)
    exact = torch.from_numpy(values).double()
    rounded = torch.from_numpy(values).to(arithmetic.dtype).double()
    finite = torch.isfinite(rounded)
    error = screen.output_error(rounded, arithmetic)
    assert ((rounded - exact).abs()[finite] <= error[finite]).all()
    assert (error[finite] > 0).all()  # never a bound of 0 where something rounds
    # tight: the bound is reached (a tie halfway between two numbers rounds by exactly h)
    assert ((rounded - exact).abs()[finite] == error[finite]).any()
    special = torch.tensor([math.inf, -math.inf, 0.5], dtype=torch.float64)
    assert screen.output_error(special, arithmetic)[:2].tolist() == [0.0, 0.0]
    assert (screen.output_error(special, screen.FP32) == 0).all()


@pytest.mark.parametrize("arithmetic", HALF_OUTPUTS, ids=lambda a: a.name)
def test_scores_widened_by_the_output_error_keep_the_order_of_the_products(arithmetic):
    """Over every finite number x of the output type, x + h(x) and x - h(x) strictly increase:
    s̃ ± h(p̃) order the references as s̃ does, and the admission screen's integer compare of
    bits is the compare of p̃ + h(p̃) (`knn_admission._reaching_bits`)."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    numbers = bits.view(arithmetic.dtype).double()
    numbers = numbers[torch.isfinite(numbers) & (numbers != 0)].unique()  # ascending, no ±0
    numbers = torch.cat(
        (numbers[numbers < 0], torch.zeros(1, dtype=torch.float64), numbers[numbers > 0])
    )  # one 0
    error = screen.output_error(numbers, arithmetic)
    assert ((numbers + error).diff() > 0).all()
    assert ((numbers - error).diff() > 0).all()
