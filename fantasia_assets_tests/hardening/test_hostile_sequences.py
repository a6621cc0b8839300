"""Sequence text that is not plain residues: gaps, digits, whitespace, foreign characters, nothing.

The rule (core/sequences.py): whitespace, digits and gaps are removed; anything else outside the
IUPAC protein letters makes a reference refused at load (naming the record) and a query searched
without alignment metrics (with a warning naming it).
"""

from __future__ import annotations

import gzip
import logging
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa

from fantasia_assets import cli
from fantasia_assets.config import parse_config
from fantasia_assets.core.alignment import METRIC_COLUMNS, traceback_metrics
from fantasia_assets.db.loader import load_references
from fantasia_assets.runner import run_lookup
from fantasia_assets_tests.conftest import SAMPLE
from fantasia_assets_tests.hardening.helpers import config_dict, near_only, sample_groups, write_queries

FASTA = SAMPLE / "references.fasta.gz"
GAF = SAMPLE / "references.gaf.gz"
OBO = SAMPLE / "go-basic.obo.gz"
NEAR = SAMPLE / "references_near.h5"

# how people write the same residues: gaps of an alignment, numbered lines, spaces, line breaks
WRITTEN = {
    "gap": lambda s: s[:5] + "-" + s[5:9] + "..." + s[9:],
    "digit": lambda s: "1 " + s[:10] + " 11 " + s[10:],
    "space": lambda s: s[:7] + " " + s[7:] + " ",
    "line_break": lambda s: s[:4] + "\n" + s[4:20] + "\r\n" + s[20:],
    "ending_stops": lambda s: s + "*\n**",  # a translated proteome's
}


def _raw(experiment: Path, accession: str) -> pl.DataFrame:
    return pl.read_csv(experiment / "raw_results" / "NEAR" / "layer_0" / f"{accession}.csv")


def _lookup(engine, experiment: Path, queries: Path, **overrides):
    return run_lookup(parse_config(config_dict(experiment, queries, **near_only([0]), **overrides)), engine)


def test_query_sequence_with_gap_digit_space_line_break_or_ending_stops__aligned_as_its_residues(
    sample_loaded, tmp_path
):
    [(name, content)] = sample_groups(1)
    groups = [(name, content)]
    groups += [
        (f"{name}_{kind}", {**content, "sequence": edit(content["sequence"])})
        for kind, edit in WRITTEN.items()
    ]
    queries = write_queries(tmp_path / "queries.h5", groups)
    experiment = tmp_path / "experiment"
    _lookup(sample_loaded, experiment, queries)
    accession = name[len("accession_") :]
    plain = _raw(experiment, accession)
    assert plain.height and plain["identity"].null_count() == 0
    for kind in WRITTEN:
        written = _raw(experiment, f"{accession}_{kind}")
        assert written.drop("accession").equals(plain.drop("accession")), kind
    # the same residues are one query sequence, whatever way they were written
    mapping = pl.read_csv(experiment / "query_index_mapping.csv")
    assert mapping.height == 1 and mapping["accessions"][0].count("|") == len(WRITTEN)
    assert pl.read_csv(experiment / "skipped_queries.csv").height == 0


UNALIGNABLE = [
    ("MKV#LA", "character '#' at residue 4 is not an IUPAC protein letter"),
    ("MKVÉLA", "character 'É' at residue 4 is not an IUPAC protein letter"),
    ("", "empty sequence"),
    ("- 12 -", "empty sequence"),
]


def test_query_sequence_that_cannot_be_aligned__searched_with_empty_metrics_and_a_warning(
    sample_loaded, tmp_path, caplog
):
    groups = sample_groups(len(UNALIGNABLE) + 1)
    for index, (sequence, _) in enumerate(UNALIGNABLE, start=1):
        groups[index] = (groups[index][0], {**groups[index][1], "sequence": sequence})
    queries = write_queries(tmp_path / "queries.h5", groups)
    experiment = tmp_path / "experiment"
    with caplog.at_level(logging.WARNING):
        _lookup(sample_loaded, experiment, queries)
    summary = set(pl.read_csv(experiment / "summary.csv")["accession"])
    for (bad, _), (_, reason) in zip(groups[1:], UNALIGNABLE, strict=True):
        assert f"{queries}: {bad}: {reason}" in caplog.text
        rows = _raw(experiment, bad[len("accession_") :])
        assert rows.height > 0 and rows["reliability_index"].null_count() == 0
        assert all(rows[column].null_count() == rows.height for column in METRIC_COLUMNS)
        assert bad[len("accession_") :] in summary
    assert caplog.text.count("still searched, but its alignment metrics are left empty") == len(UNALIGNABLE)
    good = _raw(experiment, groups[0][0][len("accession_") :])
    assert good["identity"].null_count() == 0


def test_empty_query_sequence_with_redundancy_masking__searched_unmasked_with_a_warning(
    sample_loaded, tmp_path, caplog
):
    # every sample query, as test_mmseqs_faults clusters them (so the session's cluster cache
    # serves both), and one more whose sequence is empty, sorted last so the others keep Q0..Q49
    groups = sample_groups()
    groups.append(("accession_ZZZ_EMPTY", {**groups[0][1], "sequence": ""}))
    queries = write_queries(tmp_path / "queries.h5", groups)
    experiment = tmp_path / "experiment"
    with caplog.at_level(logging.WARNING):
        _lookup(sample_loaded, experiment, queries, **{"lookup.redundancy.identity": 0.95})
    assert (
        "1 sequences cannot be clustered by MMseqs2 (empty, or not IUPAC protein letters): Q50" in caplog.text
    )
    assert f"{queries}: accession_ZZZ_EMPTY: empty sequence" in caplog.text
    # nothing masked for it: the neighbours its vector has without masking
    plain = tmp_path / "plain"
    _lookup(sample_loaded, plain, write_queries(tmp_path / "one.h5", groups[:1]))
    columns = ["ref_idx", "distance", "go_id", "reliability_index"]
    unmasked = _raw(experiment, "ZZZ_EMPTY").select(columns)
    assert unmasked.equals(_raw(plain, groups[0][0][len("accession_") :]).select(columns))


def _fasta_with(tmp_path: Path, edit) -> tuple[Path, str, str]:
    """The sample FASTA with the first record's sequence lines replaced by edit(sequence)."""
    lines = gzip.decompress(FASTA.read_bytes()).decode().split("\n")
    accession, sequence = lines[0][1:].split()[0], lines[1]
    lines[1] = edit(sequence)
    path = tmp_path / "references.fasta"
    path.write_text("\n".join(lines))
    return path, accession, sequence


def test_reference_fasta_with_gaps_digits_whitespace_and_ending_stops__loaded_as_its_residues(
    engine, tmp_path
):
    def written(sequence: str) -> str:
        spaced = WRITTEN["line_break"](WRITTEN["space"](WRITTEN["digit"](WRITTEN["gap"](sequence.lower()))))
        return WRITTEN["ending_stops"](spaced)

    fasta, accession, sequence = _fasta_with(tmp_path, written)
    report = load_references(engine, fasta=fasta, gaf=[GAF], obo=OBO, embeddings=NEAR, model="NEAR")
    with engine.connect() as conn:
        stored = conn.execute(
            sa.text(
                "SELECT s.sequence FROM protein p JOIN sequence s ON s.id = p.sequence_id WHERE p.id = :p"
            ),
            {"p": accession},
        ).scalar()
        embedded = conn.execute(
            sa.text(
                "SELECT count(*) FROM sequence_embeddings e JOIN protein p ON p.sequence_id = e.sequence_id "
                "WHERE p.id = :p"
            ),
            {"p": accession},
        ).scalar()
    assert stored == sequence
    assert embedded == 3  # its HDF5 sequence matched the cleaned one: every layer loaded
    assert not any("differs" in reason for reason in report.skipped)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s[:3] + "#" + s[3:], "character '#' at residue 4"),
        (lambda s: "12 - 34", "empty sequence"),
    ],
    ids=["hash", "nothing_but_gaps_and_digits"],
)
def test_reference_fasta_with_an_unusable_sequence__load_refused_naming_the_record(
    engine, tmp_path, capsys, edit, message
):
    fasta, accession, _ = _fasta_with(tmp_path, edit)
    code = cli.main(["load-references", "--fasta", str(fasta), "--gaf", str(GAF), "--obo", str(OBO)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: {fasta}:1: record {accession!r}: {message}")
    assert "Traceback" not in err
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM protein")).scalar() == 0


def test_reference_sequences_with_gaps_loaded_before_the_rule__lookup_aligns_or_warns(
    sample_loaded, tmp_path, caplog
):
    groups = sample_groups(4)
    queries = write_queries(tmp_path / "queries.h5", groups)
    experiment = tmp_path / "experiment"
    _lookup(sample_loaded, experiment, queries)
    before = _raw(experiment, groups[0][0][len("accession_") :])
    gapped, foreign = before["ref_idx"].unique(maintain_order=True).to_list()[:2]
    # what an older release or another tool may have stored: gaps, and a character no rule accepts
    with sample_loaded.begin() as conn:
        conn.execute(
            sa.text("UPDATE sequence SET sequence = '-' || lower(sequence) || ' 7' WHERE id = :i"),
            {"i": gapped},
        )
        conn.execute(sa.text("UPDATE sequence SET sequence = sequence || '#' WHERE id = :i"), {"i": foreign})
    again = tmp_path / "again"
    with caplog.at_level(logging.WARNING):
        _lookup(sample_loaded, again, queries)
    after = _raw(again, groups[0][0][len("accession_") :])
    same = pl.col("ref_idx") == gapped
    assert after.filter(same).equals(before.filter(same))
    assert all(after.filter(pl.col("ref_idx") == foreign)[c].null_count() > 0 for c in METRIC_COLUMNS)
    assert f"reference sequences R{foreign} break the sequence rule" in caplog.text
    with sample_loaded.connect() as conn:
        reference = conn.execute(
            sa.text("SELECT sequence FROM sequence WHERE id = :i"), {"i": gapped}
        ).scalar()
    row = after.filter(same).row(0, named=True)
    expected = traceback_metrics(groups[0][1]["sequence"], reference)
    assert row["identity"] == pytest.approx(expected["identity"], abs=1e-4)
