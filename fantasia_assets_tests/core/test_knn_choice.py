"""``screening="auto"``'s choice of the int8 screen (`knn_choice`): taken on separated
neighbourhoods, where its wider window costs few candidates, and not on dense ones, where it
costs many; either way the answer is the float64 oracle's. The probe's times are fixed here, so
that the choice depends on the data alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fantasia_assets.core import knn_choice, screen, units
from fantasia_assets.core.knn import SearchEngine
from fantasia_assets_tests.conftest import shared_file
from fantasia_assets_tests.core.test_knn import read_embeddings
from fantasia_assets_tests.core.test_knn_screen import exact_oracle

pytestmark = pytest.mark.skipif(
    not screen.int8_sums_exactly(), reason="this CPU's int8 product does not sum exactly"
)


@pytest.fixture
def fixed_units(monkeypatch):
    """bfloat16 screens on any CPU; one multiply-add costs 40 ps in float32, 20 in bfloat16 and
    10 in int8 (about this project's machine, one thread)."""
    monkeypatch.setattr(screen, "cpu_has_bf16_units", lambda: True)
    monkeypatch.setattr(screen, "bf16_beats_float32", lambda: True)
    monkeypatch.setattr(units, "seconds_per_product", lambda: (40e-12, 20e-12))
    monkeypatch.setattr(units, "int8_seconds_per_product", lambda: 10e-12)


def families(n_families: int, members: int, dim: int, spread: float, seed: int) -> np.ndarray:
    """Rows scattered tightly (`spread`) around random family centres, shuffled."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_families, dim))
    rows = np.repeat(centres, members, axis=0) + spread * rng.standard_normal((n_families * members, dim))
    return rows[rng.permutation(len(rows))].astype(np.float32)


def test_auto_takes_int8_on_separated_families_with_the_oracle_answer(fixed_units):
    references = families(600, 10, 512, 0.3, seed=1)
    queries = families(40, 1, 512, 1.0, seed=2) * 0.1 + references[:40]
    auto = SearchEngine("cosine", "torch", "cpu", screening="auto").build(references)
    assert auto.screening == "int8"
    expected = exact_oracle(queries, references, "cosine", 5, ties=True)
    got = auto.search(queries, 5, tie_expansion=True)
    np.testing.assert_array_equal(got[1], expected[1])
    np.testing.assert_array_equal(got[0], expected[0])


def test_auto_keeps_bf16_on_dense_real_neighbourhoods(fixed_units):
    """NEAR's layer 1 (real 256-d embeddings): a thousand bfloat16 candidates a row, several
    times as many in int8's window."""
    references = read_embeddings(shared_file("reference_human.h5"), 3000, layer=1)
    queries = read_embeddings(shared_file("queries_mouse.h5"), 60, layer=1)
    auto = SearchEngine("cosine", "torch", "cpu", screening="auto").build(references)
    assert auto.screening == "bf16"
    expected = exact_oracle(queries, references, "cosine", 5)
    for got, want in zip(auto.search(queries, 5), expected, strict=True):
        np.testing.assert_array_equal(got, want)


def test_the_estimate_weighs_products_against_candidates(fixed_units, monkeypatch):
    """The same separated data flips to bfloat16 when int8's product is no cheaper, and a pinned
    screen is never second-guessed."""
    references = families(600, 10, 512, 0.3, seed=1)
    bf16 = screen.resolve_screening("bf16", "torch", torch.device("cpu"), "cosine")
    assert knn_choice.prefers_int8(references, bf16, 16384, 1e-6) is not None
    monkeypatch.setattr(units, "int8_seconds_per_product", lambda: 20e-12)
    assert knn_choice.prefers_int8(references, bf16, 16384, 1e-6) is None
    monkeypatch.setattr(units, "int8_seconds_per_product", lambda: 10e-12)
    assert SearchEngine("cosine", "torch", "cpu", screening="bf16").build(references).screening == "bf16"
    assert SearchEngine("euclidean", "torch", "cpu", screening="auto").build(references).screening == "bf16"


def test_one_outlying_reference_beyond_the_first_block_counts(fixed_units):
    """The references share the factor of the largest unit-row component of all of them: one
    spike (a one-hot row) after the sampled block coarsens every row's int8 operands, which the
    estimate sees, and the factor comes from it; with the spike as the last row the answer is
    still the oracle's."""
    references = families(600, 10, 512, 0.3, seed=1)
    spiked = np.vstack([references, np.eye(1, 512, dtype=np.float32)])
    bf16 = screen.resolve_screening("bf16", "torch", torch.device("cpu"), "cosine")
    largest = knn_choice.prefers_int8(references, bf16, 4096, 1e-6)
    unit = references / np.linalg.norm(references.astype(np.float64), axis=1, keepdims=True)
    assert largest is not None and np.abs(unit).max() <= largest <= np.abs(unit).max() * (1 + 2.0**-15)
    assert knn_choice.prefers_int8(spiked, bf16, 4096, 1e-6) is None
    pinned = SearchEngine("cosine", "torch", "cpu", screening="int8").build(spiked)
    assert float(pinned._references.operand_scale[0]) == screen.shared_int8_factor(
        knn_choice.largest_unit_component(spiked)
    )
    noise = np.random.default_rng(3).standard_normal((len(spiked[::97]), 512)).astype(np.float32)
    queries = spiked[::97] + 0.05 * noise  # near the references, not equal to them
    expected = exact_oracle(queries, spiked, "cosine", 5)
    for got, want in zip(pinned.search(queries, 5), expected, strict=True):
        np.testing.assert_array_equal(got, want)
