"""The admission screen (`knn_admission`): over many small reference blocks (limits set and
tightened block by block) it gives the exact oracle's answer and the plain scipy engine's, its
candidates' error stays within the bound and holds every reference of the answer, rows it cannot
screen go to the top-m screen, and τ is rounded down in every output type."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fantasia_assets.core import knn, knn_admission, screen, units
from fantasia_assets.core.knn import SearchEngine
from fantasia_assets_tests.conftest import shared_file
from fantasia_assets_tests.core.test_knn import read_embeddings
from fantasia_assets_tests.core.test_knn_screen import (
    ADVERSARIAL,
    HALF_OUTPUTS,
    adversarial,
    exact_oracle,
    stressed_rows,
)

SCREENINGS = [
    *(["bf16"] if screen.cpu_has_bf16_units() else []),
    *(["int8"] if screen.int8_sums_exactly() else []),
    "fp32",
]


@pytest.fixture(scope="module")
def real_data():
    queries = read_embeddings(shared_file("queries_mouse.h5"), 120)
    references = read_embeddings(shared_file("reference_human.h5"), 1500)
    return queries, references


@pytest.fixture
def small_blocks(monkeypatch, request):
    """Reference blocks of `request.param` rows: many blocks, whole groups and a tail."""
    monkeypatch.setattr(knn_admission, "REFERENCE_BLOCK", request.param)


def admitted(engine: SearchEngine, queries: np.ndarray, k: int, threshold=None, exclusions=None):
    """The admission screen's (values, indices, rows) for `queries`, as the engine calls it."""
    q32 = queries.astype(np.float32)
    fast, _, _, bounds = engine._prepare_queries(q32, (q32.astype(np.float64) ** 2).sum(1))
    none = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    with screen.exact_matmul_settings(), knn_admission.single_threaded():
        return knn_admission.screen(
            engine, fast, torch.from_numpy(bounds), exclusions or none, k, threshold, torch.get_num_threads()
        )


@pytest.mark.parametrize("small_blocks", [96, 100], indirect=True)
@pytest.mark.parametrize("screening", SCREENINGS)
def test_many_blocks_equal_the_oracle_and_the_plain_engine(real_data, small_blocks, screening):
    queries, references = real_data
    engine = SearchEngine("cosine", "torch", "cpu", screening=screening).build(references)
    plain = SearchEngine("cosine", "scipy", "cpu").build(references)
    expected = exact_oracle(queries, references, "cosine", 5)
    np.testing.assert_array_equal(engine.search(queries, 5)[1], expected[1])
    np.testing.assert_array_equal(engine.search(queries, 5)[0], expected[0])
    threshold = float(expected[0][3, 2])  # exactly a distance of the answer: kept
    for options in ({"threshold": threshold}, {"tie_expansion": True}):
        for got, want in zip(
            engine.search(queries, 5, **options), plain.search(queries, 5, **options), strict=True
        ):
            np.testing.assert_array_equal(got, want)
    rng = np.random.default_rng(3)  # every query loses its 3 nearest and a few others
    excluded = [
        np.unique([*expected[1][i, :3], *rng.choice(len(references), 4)]) for i in range(len(queries))
    ]
    indptr = np.concatenate([[0], np.cumsum([len(e) for e in excluded])])
    exclude = (indptr, np.concatenate(excluded))
    for got, want in zip(
        engine.search(queries, 5, exclude=exclude), plain.search(queries, 5, exclude=exclude), strict=True
    ):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("small_blocks", [64], indirect=True)
@pytest.mark.parametrize("name", ADVERSARIAL)
def test_many_blocks_on_adversarial_data_equal_the_oracle(small_blocks, name):
    queries, references = adversarial(name, "cosine", np.random.default_rng(len(name)))
    queries, references = queries.astype(np.float32), references.astype(np.float32)
    for screening in SCREENINGS:
        engine = SearchEngine("cosine", "torch", "cpu", screening=screening).build(references)
        for ties in (False, True):
            expected = exact_oracle(queries, references, "cosine", 5, ties=ties)
            got = engine.search(queries, 5, tie_expansion=ties)
            np.testing.assert_array_equal(got[1], expected[1], err_msg=f"{name} {screening}")
            np.testing.assert_array_equal(got[0], expected[0], err_msg=f"{name} {screening}")


@pytest.mark.parametrize("screening", SCREENINGS)
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=stressed_rows(), block=st.sampled_from([8, 32, 40, 4096]))
def test_candidates_are_within_the_bound_and_hold_the_answer(screening, rows, block):
    """Every candidate's screened score is within δ + h(p̃) of its exact target T (the admission path's
    own product, of the negated operands), and every reference with T ≤ the k-th smallest T is a
    candidate of each row the screen keeps."""
    references, queries, k = rows[16:], rows[:16], 3
    engine = SearchEngine("cosine", "torch", "cpu", screening=screening).build(references)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(knn_admission, "REFERENCE_BLOCK", block)
        values, indices, kept = admitted(engine, queries, k)
    _, _, _, bounds = engine._prepare_queries(queries, (queries.astype(np.float64) ** 2).sum(1))
    q = queries.astype(np.longdouble)
    norms = np.sqrt((q * q).sum(1, keepdims=True))
    unit = np.divide(q, norms, out=np.zeros_like(q), where=norms > 0)
    prepared = engine._references.prepared(0, engine.n_references).numpy().astype(np.longdouble)
    target = (1 - unit @ prepared.T).astype(np.float64)
    for position, row in enumerate(kept):
        finite = np.isfinite(values[position].numpy())
        columns = indices[position].numpy()[finite]
        scores = values[position].numpy()[finite] + 1.0
        rounding = screen.output_error(values[position][finite], engine.arithmetic).numpy()
        assert np.all(np.abs(scores - target[row, columns]) <= bounds[row, 0] + rounding)
        answer = np.flatnonzero(target[row] <= np.sort(target[row])[k - 1])
        assert set(answer) <= set(columns.tolist())


@pytest.fixture
def bf16_chosen(monkeypatch):
    """`screening="auto"` choosing bfloat16, whatever this CPU's probe says (torch multiplies
    bfloat16 everywhere; the bound covers any kernel that sums in float32)."""
    monkeypatch.setattr(screen, "cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(screen, "bf16_beats_float32", lambda: True)
    # the probe's times, fixed: a first block of all 3,000 × 256 references allows 64 candidates
    float32 = 64 * (knn._CANDIDATE_SECONDS[0] + 256 * knn._CANDIDATE_SECONDS[1]) / (3000 * 256)
    monkeypatch.setattr(units, "seconds_per_product", lambda: (float32, float32 / 2))


def _fallbacks(monkeypatch) -> list[bool]:
    """Per admission screen of the 16-bit engine: whether it gave up on a dense block."""
    seen, real = [], knn_admission.screen

    def screen_(engine, *args, **kwargs):
        found = real(engine, *args, **kwargs)
        if engine.arithmetic.half:
            seen.append(found is None)
        return found

    monkeypatch.setattr(knn_admission, "screen", screen_)
    return seen


@pytest.mark.parametrize("small_blocks", [100, 16384], indirect=True)
def test_dense_neighbourhoods_are_screened_in_float32_with_the_same_answer(
    bf16_chosen, small_blocks, monkeypatch
):
    """NEAR's second layer crowds hundreds of references within the bf16 window of each query:
    auto's bf16 engine hands such query blocks to its float32 view, and the answer (thresholds,
    ties, exclusions included) is the oracle's. Its first layer stays in bf16, and a pinned bf16
    never switches."""
    queries = read_embeddings(shared_file("queries_mouse.h5"), 150, layer=1)
    references = read_embeddings(shared_file("reference_human.h5"), 3000, layer=1)
    fallbacks = _fallbacks(monkeypatch)
    engine = SearchEngine("cosine", "torch", "cpu", screening="auto").build(references)
    assert engine.screening == "bf16" and engine._float32.screening == "fp32"
    expected = exact_oracle(queries, references, "cosine", 5)
    threshold = float(expected[0][3, 2])
    expected_ties = exact_oracle(queries, references, "cosine", 5, ties=True)
    for options in ({}, {"threshold": threshold}, {"tie_expansion": True}):
        want = exact_oracle(
            queries, references, "cosine", 5, options.get("threshold"), "tie_expansion" in options
        )
        for got, wanted in zip(engine.search(queries, 5, **options), want, strict=True):
            np.testing.assert_array_equal(got, wanted)
    assert fallbacks and all(fallbacks)
    excluded = [np.unique([*expected[1][i, :2], 7]) for i in range(len(queries))]
    indptr = np.concatenate([[0], np.cumsum([len(e) for e in excluded])])
    plain = SearchEngine("cosine", "scipy", "cpu").build(references)
    exclude = (indptr, np.concatenate(excluded))
    for got, want in zip(
        engine.search(queries, 5, exclude=exclude), plain.search(queries, 5, exclude=exclude), strict=True
    ):
        np.testing.assert_array_equal(got, want)
    fallbacks.clear()
    pinned = SearchEngine("cosine", "torch", "cpu", screening="bf16").build(references)
    assert pinned._float32 is None
    for got, want in zip(pinned.search(queries, 5), expected, strict=True):
        np.testing.assert_array_equal(got, want)
    assert fallbacks and not any(fallbacks)
    if screen.int8_sums_exactly():  # asked for for speed, the int8 screen switches as auto does
        fallbacks.clear()
        fast = SearchEngine("cosine", "torch", "cpu", screening="int8").build(references)
        for got, want in zip(fast.search(queries, 5, tie_expansion=True), expected_ties, strict=True):
            np.testing.assert_array_equal(got, want)
        assert fallbacks and all(fallbacks)
    if len(references) > knn_admission.REFERENCE_BLOCK:  # a small block weighs its candidates more
        return
    first_layer = read_embeddings(shared_file("reference_human.h5"), 3000)
    fallbacks.clear()
    SearchEngine("cosine", "torch", "cpu").build(first_layer).search(
        read_embeddings(shared_file("queries_mouse.h5"), 150), 5
    )
    assert fallbacks and not any(fallbacks)


def test_rows_it_cannot_screen_go_to_the_top_m_screen():
    """A zero query (no positive limit) and queries with thousands of tied references (over the
    candidate cap) are left out, and the engine's answer still equals the oracle's."""
    rng = np.random.default_rng(5)
    distinct = rng.standard_normal((3, 8)).astype(np.float32)
    references = np.repeat(distinct, knn_admission._MAX_CANDIDATES + 1, axis=0)
    queries = np.vstack([np.zeros((1, 8)), distinct[:1], rng.standard_normal((2, 8))]).astype(np.float32)
    for screening in SCREENINGS:
        engine = SearchEngine("cosine", "torch", "cpu", screening=screening).build(references)
        _, _, kept = admitted(engine, queries, 4)
        assert 0 not in kept and 1 not in kept
        expected = exact_oracle(queries, references, "cosine", 4)
        for got, want in zip(engine.search(queries, 4), expected, strict=True):
            np.testing.assert_array_equal(got, want)


@given(st.lists(st.floats(2.0**-140, 3.0), min_size=1, max_size=50))
@settings(max_examples=60, deadline=None)
def test_tau_is_rounded_down_to_the_output_type(values):
    tau = np.array(values)
    for out_dtype in (torch.bfloat16, torch.float16, torch.float32):
        bits = knn_admission._round_down_bits(tau, out_dtype)
        integer = torch.int32 if out_dtype == torch.float32 else torch.int16
        got = torch.from_numpy(np.ascontiguousarray(bits)).view(out_dtype).double().numpy()
        above = torch.from_numpy(np.ascontiguousarray(bits + 1)).to(integer).view(out_dtype).double().numpy()
        assert np.all(got <= tau) and np.all(above > tau)
    assert np.all(knn_admission._round_down_bits(np.array([0.0, -1.0, np.nan]), torch.bfloat16) <= 0)


@pytest.mark.parametrize("arithmetic", HALF_OUTPUTS, ids=lambda a: a.name)
def test_admission_bits_are_the_smallest_number_whose_reach_meets_the_limit(arithmetic):
    """`_reaching_bits`: the smallest non-negative number p̃ of the output type with
    p̃ + h(p̃) ≥ τ, checked against every number of the type, for τ anywhere in (0, 2], at and
    just below each number's reach, and tiny; 0 where τ ≤ 0 or is NaN."""
    bits = torch.arange(0, 2**15, dtype=torch.int32).to(torch.int16)
    numbers = bits.view(arithmetic.dtype).double()
    finite = torch.isfinite(numbers)
    reach = (numbers + screen.output_error(numbers, arithmetic))[finite].numpy()  # increasing
    rng = np.random.default_rng(3)
    picked = reach[rng.integers(0, len(reach), 20_000)]
    tau = np.concatenate([
        rng.uniform(0, 2, 20_000), 2.0 ** rng.uniform(-140, 1, 20_000), picked, np.nextafter(picked, 0),
        np.nextafter(picked, 3), [0.0, -1.0, np.nan, 1e-45, 2.0],
    ])  # fmt: skip
    tau = tau[~(tau > 4.0)]  # cosine: p̃ ≤ 1 + 2.1u (NaN stays)
    expected = np.where(np.isnan(tau) | (tau <= 0), 0, np.searchsorted(reach, tau, side="left"))
    np.testing.assert_array_equal(knn_admission._reaching_bits(tau, arithmetic), expected.astype(np.int16))


@settings(max_examples=200, deadline=None)
@given(
    unit=st.floats(2.0**-40, 2.0**-10),
    ratio=st.floats(2.0**-8, 2.0**31 + 4.0),
    nudge=st.integers(-3, 3),
)
def test_int8_limits_are_the_smallest_integer_whose_product_reaches_tau(unit, ratio, nudge):
    """`_integer_reaching`: the smallest P ≥ 1 with fl(P·unit) ≥ τ (the int8 screen's values are
    that float64 product, `_collected`), checked against its neighbours, at τ exactly some fl(P·unit)
    and a step either side; the int32 maximum where no product can reach; 0 where τ ≤ 0 or NaN."""
    exact = np.float64(max(np.floor(ratio), 1.0)) * unit  # some fl(P·unit), or a step either side
    exact = np.nextafter(exact, np.inf if nudge > 0 else -np.inf) if nudge in (-1, 1) else exact
    tau = np.array([ratio * unit if abs(nudge) > 1 else exact, 0.0, -1.0, np.nan])
    units_ = np.full(4, unit)
    got = knn_admission._integer_reaching(tau, units_)
    assert got.dtype == np.int32 and list(got[1:]) == [0, 0, 0]
    if tau[0] / unit >= 2.0**31:
        assert got[0] == np.iinfo(np.int32).max
        return
    p = int(got[0])
    assert p >= 1 and np.float64(p) * unit >= tau[0]
    assert p == 1 or np.float64(p - 1) * unit < tau[0]


@pytest.mark.skipif(not screen.int8_sums_exactly(), reason="this CPU's int8 product does not sum exactly")
def test_int8_references_share_one_factor_and_select_on_integers(real_data):
    """The int8 screen's references share the factor of their largest component (so a query's
    scores are monotone in its integer products), its queries keep one each; the admission screen
    returns the very values P·fl(c·d) its top-m screen computes, and every row screens itself."""
    queries, references = real_data
    engine = SearchEngine("cosine", "torch", "cpu", screening="int8").build(references)
    scale = engine._references.operand_scale
    unit = references / np.linalg.norm(references.astype(np.float64), axis=1, keepdims=True)
    assert torch.all(scale == scale[0])
    largest = float(np.abs(unit).max())
    assert largest <= 127 * float(scale[0]) * (1 + 2.0**-20) and float(scale[0]) * 126 < largest
    values, indices, kept = admitted(engine, queries, 5)
    assert len(kept) == len(queries)
    q32 = queries.astype(np.float32)
    fast = engine._prepare_queries(q32, (q32.astype(np.float64) ** 2).sum(1))[0]
    buffers = [
        torch.empty(len(q32) * len(references), dtype=torch.int32),
        torch.empty(len(q32) * len(references), dtype=torch.float64),
    ]
    full = screen.int8_product(fast, engine._references.operands, scale, buffers)
    finite = torch.isfinite(values)
    rows = torch.arange(len(q32))[:, None].expand_as(values)[finite]
    np.testing.assert_array_equal(values[finite].numpy(), full[rows, indices[finite]].numpy())
