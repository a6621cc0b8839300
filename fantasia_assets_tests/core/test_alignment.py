"""Alignment metrics: the fast path against FANTASIA's traceback counting, on real Swiss-Prot pairs."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import parasail
import polars as pl
import pytest

from fantasia_assets.core.alignment import (
    METRIC_COLUMNS,
    alignment_metrics,
    traceback_metrics,
)
from fantasia_assets.db.sources import read_fasta
from fantasia_assets_tests.conftest import shared_file

# Lengths of the ordinary pairs are capped to keep the traceback reference quick on 2 cores;
# the long and saturating pairs are added on purpose.
MAX_LENGTH = 1500
N_ORTHOLOGS = 110
N_UNRELATED = 150
LONG_ORTHOLOGS = (("A2AGL3", "Q15413"), ("Q91ZX7", "Q07954"))  # RYR3 4863/4870 aa, LRP1 4545/4544 aa
SELENOPROTEINS = (("P70274", "P49908"), ("Q9JMH6", "Q16881"), ("P70274", "P07203"))  # U against U and others
WITH_X = (("P01817", "Q02505"), ("P01817", "P01817"))  # X against X; Q02505 is 2,541 aa
# Co-optimal alignments: gaps placeable anywhere in a run, repeats giving several best local hits.
TIES = (
    ("WHEATWHEATWHEAT", "WHEAT"),
    ("WHEAT", "WHEATWHEATWHEAT"),
    ("MKAAAAAKM", "MKAAAKM"),
    ("GGGGGG", "GGG"),
    ("AGAGAGAGAG", "GAGA"),
    ("PEPTIDEKPEPTIDE", "PEPTIDEPEPTIDE"),
    ("CCCCWCCCC", "CCCCCCCC"),
)


@pytest.fixture(scope="module")
def sequences() -> dict[str, str]:
    frame = read_fasta(shared_file("sequences.fasta.gz"))
    return dict(zip(frame["accession"], frame["sequence"]))


@pytest.fixture(scope="module")
def real_pairs(sequences: dict[str, str]) -> list[tuple[str, str]]:
    """~300 mouse query × human reference pairs: orthologs, unrelated, short, long, rare letters."""
    mouse = _accessions(shared_file("queries_mouse.h5"))
    human = _accessions(shared_file("reference_human.h5"))
    symbols = pl.read_csv(
        shared_file("annotations_human_mouse.tsv.gz"),
        separator="\t",
        columns=["accession", "db_object_symbol"],
    ).unique("accession", keep="first")
    symbol_of = dict(zip(symbols["accession"], symbols["db_object_symbol"].str.to_uppercase()))
    human_by_symbol: dict[str, str] = {}
    for accession in human:
        if accession in symbol_of:
            human_by_symbol.setdefault(symbol_of[accession], accession)

    def fits(accession: str) -> bool:
        return len(sequences[accession]) <= MAX_LENGTH

    orthologs = [
        (m, human_by_symbol[symbol_of[m]])
        for m in mouse
        if symbol_of.get(m) in human_by_symbol and fits(m) and fits(human_by_symbol[symbol_of[m]])
    ][:N_ORTHOLOGS]
    rng = np.random.default_rng(7)
    short_mouse = [a for a in mouse if fits(a)]
    short_human = [a for a in human if fits(a)]
    mouse_picks = rng.integers(0, len(short_mouse), N_UNRELATED)
    human_picks = rng.integers(0, len(short_human), N_UNRELATED)
    unrelated = [(short_mouse[i], short_human[j]) for i, j in zip(mouse_picks, human_picks)]
    shortest = sorted(sequences, key=lambda a: (len(sequences[a]), a))[:6]  # 24-37 aa
    tiny = [(a, b) for a in shortest for b in shortest[:3]] + [
        (a, short_human[k]) for k, a in enumerate(shortest)
    ]
    named = orthologs + unrelated + tiny + list(LONG_ORTHOLOGS) + list(SELENOPROTEINS) + list(WITH_X)
    return [(sequences[q], sequences[r]) for q, r in named] + list(TIES)


def _accessions(path: Path) -> list[str]:
    with h5py.File(path, "r") as handle:
        return sorted(name.removeprefix("accession_") for name in handle.keys())


def _expected(pairs: list[tuple[str, str]]) -> pl.DataFrame:
    return pl.DataFrame([traceback_metrics(q, r) for q, r in pairs]).select(METRIC_COLUMNS)


def _assert_identical(fast: pl.DataFrame, expected: pl.DataFrame) -> None:
    assert fast.columns == list(METRIC_COLUMNS)
    assert all(dtype == pl.Float64 for dtype in fast.dtypes)
    fast_values, expected_values = fast.to_numpy(), expected.to_numpy()
    differing = np.flatnonzero((fast_values != expected_values).any(axis=1))
    assert not len(differing), f"rows {differing[:10].tolist()} differ from the traceback metrics"


def test_fast_path_equals_traceback_on_real_pairs(real_pairs):
    fast = alignment_metrics([q for q, _ in real_pairs], [r for _, r in real_pairs], workers=2)
    expected = _expected(real_pairs)
    _assert_identical(fast, expected)
    # the sample spans what the pipeline meets: orthologs, unrelated pairs, gapped local hits
    assert len(real_pairs) >= 290
    assert (expected["identity"] > 0.8).sum() > 50
    assert (expected["identity"] < 0.3).sum() > 50
    assert (expected["gaps_percentage_sw"] > 0).sum() > 50
    assert max(len(q) for q, _ in real_pairs) > 2000


def test_stats_kernels_would_not_give_the_traceback_numbers(real_pairs):
    # Why the fast path uses traceback kernels: the stats ones leave leading end gaps out of the
    # global length and compare matrix rows, not letters (U and O both score like '*').
    lengths_differ = 0
    for query, reference in real_pairs[:150]:
        stats = parasail.nw_stats_scan_16(query, reference, 10, 1, parasail.blosum62)
        lengths_differ += stats.length != traceback_metrics(query, reference)["alignment_length"]
    assert lengths_differ > 0
    assert parasail.nw_stats_scan_16("U", "O", 10, 1, parasail.blosum62).matches == 1


def test_metrics_of_a_hand_checked_pair():
    # MKTAY-AKQR: M5 K5 T5 A4 Y7 + A4 K5 Q5 R5 = 45, one gap −10; both alignments are the same
    metrics = traceback_metrics("MKTAYIAKQR", "MKTAYAKQR")
    for suffix in ("", "_sw"):
        assert metrics["identity" + suffix] == 0.9
        assert metrics["similarity" + suffix] == 0.9
        assert metrics["gaps_percentage" + suffix] == 0.1
        assert metrics["alignment_score" + suffix] == 35.0
        assert metrics["alignment_length" + suffix] == 10.0
    assert alignment_metrics(["MKTAYIAKQR"], ["MKTAYAKQR"]).row(0, named=True) == metrics


def test_co_optimal_alignments_choose_the_traceback_path():
    pairs = list(TIES) + [(r, q) for q, r in TIES]
    _assert_identical(alignment_metrics([q for q, _ in pairs], [r for _, r in pairs]), _expected(pairs))


def test_saturating_16_bit_scores_fall_back_to_32_bits(sequences):
    titin, short, nebulin = sequences["A2ASS6"], sequences["P0CJ72"], sequences["P20929"]
    profile = parasail.profile_create_16(titin, parasail.blosum62)
    assert parasail.nw_trace_scan_profile_16(profile, short, 10, 1).saturated  # −(10 + 35,188) < −32,768
    profile = parasail.profile_create_16(nebulin, parasail.blosum62)
    assert parasail.sw_trace_scan_profile_16(profile, nebulin, 10, 1).saturated  # score > 32,767
    pairs = [(titin, short), (nebulin, nebulin)]
    _assert_identical(alignment_metrics([q for q, _ in pairs], [r for _, r in pairs]), _expected(pairs))


def test_case_and_rare_letters():
    upper = alignment_metrics(["MKUOBZXJ*W"], ["MKUOBZXW*J"])
    assert upper.equals(alignment_metrics(["mkuobzxj*w"], ["MkUoBzXw*j"]))
    row = upper.row(0, named=True)
    assert row == traceback_metrics("mkuobzxj*w", "MkUoBzXw*j")
    # U against O scores like '*' against '*' (+1): similar, not identical
    assert traceback_metrics("U", "O")["identity"] == 0.0
    assert traceback_metrics("U", "O")["similarity"] == 1.0


@pytest.mark.parametrize(
    "bad, message", [("MK#V", "'#' at residue 3"), ("MKÉ", "'É' at residue 3"), ("MKßV", "'ß'")]
)
def test_invalid_characters_name_the_sequence(bad, message):
    with pytest.raises(ValueError, match=f"references\\[1\\]: character {message}"):
        alignment_metrics(["MKV", "MKV"], ["MKV", bad])
    with pytest.raises(ValueError, match=message):
        traceback_metrics("MKV", bad)


@pytest.mark.parametrize("written", ["MK-V", "mk v", "MK\nV", "1 MKV 3", "M.K-V"])
def test_gaps_digits_and_whitespace_are_removed_before_aligning(written):
    assert traceback_metrics("MKVW", written) == traceback_metrics("MKVW", "MKV")
    assert alignment_metrics(["MKVW"], [written]).equals(alignment_metrics(["MKVW"], ["MKV"]))


def test_unusable_pairs_left_empty_on_request():
    queries, references = ["MKVW", "MK#V", "", "MKVW"], ["MKV", "MKV", "MKV", "MKÉ"]
    frame = alignment_metrics(queries, references, skip_unusable=True)
    assert frame.row(0, named=True) == traceback_metrics("MKVW", "MKV")
    assert all(value is None for row in frame.rows()[1:] for value in row)
    assert frame.schema == alignment_metrics(["M"], ["M"]).schema
    everything_unusable = alignment_metrics(["MK#"], ["MKV"], skip_unusable=True)
    assert everything_unusable.rows() == [(None,) * 10]


def test_invalid_arguments():
    with pytest.raises(ValueError, match="2 queries but 1 references"):
        alignment_metrics(["MKV", "MKV"], ["MKV"])
    with pytest.raises(ValueError, match="workers must be at least 1"):
        alignment_metrics(["MKV"], ["MKV"], workers=0)
    with pytest.raises(ValueError, match=r"queries\[0\] is NoneType"):
        alignment_metrics([None], ["MKV"])


def test_empty_sequences():
    pairs = [("", ""), ("", "MKVW"), ("MKV", ""), ("M", "W")]
    fast = alignment_metrics([q for q, _ in pairs], [r for _, r in pairs])
    assert fast.to_dicts() == [traceback_metrics(q, r) for q, r in pairs]
    both_empty, one_empty, other_empty, unrelated = fast.to_dicts()
    assert set(both_empty.values()) == {0.0}
    # the global alignment is one gap of 4 columns: −(10 + 3 × 1)
    assert one_empty["alignment_score"] == -13.0
    assert one_empty["alignment_length"] == 4.0
    assert one_empty["gaps_percentage"] == 1.0
    assert other_empty["alignment_score"] == -12.0
    assert all(one_empty[c + "_sw"] == 0.0 for c in ("identity", "alignment_score", "alignment_length"))
    # M against W scores −1: no local alignment, which scores 0
    assert unrelated["alignment_score"] == -1.0
    assert unrelated["alignment_score_sw"] == 0.0
    assert unrelated["alignment_length_sw"] == 0.0


def test_duplicates_keep_input_order_whatever_the_workers(real_pairs):
    picked = [real_pairs[i] for i in (3, 150, 3, 200, 150, 3, 280)]
    queries, references = [q for q, _ in picked], [r for _, r in picked]
    serial = alignment_metrics(queries, references, workers=1)
    assert serial.equals(alignment_metrics(queries, references, workers=2))
    _assert_identical(serial, _expected(picked))
    assert serial.row(0) == serial.row(2) == serial.row(5)


def test_a_memory_budget_below_one_table_still_aligns_everything(real_pairs):
    picked = real_pairs[:20]
    fast = alignment_metrics([q for q, _ in picked], [r for _, r in picked], workers=2, trace_memory_bytes=1)
    _assert_identical(fast, _expected(picked))
