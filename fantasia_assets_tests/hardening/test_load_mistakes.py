"""Mistakes made when loading references: a wrong file or option is refused, a partial FASTA
changes only the proteins it holds, and whatever a load leaves out is counted and named."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import sqlalchemy as sa

from fantasia_assets import cli
from fantasia_assets.db.loader import load_references
from fantasia_assets.db.sources import GO_EVIDENCE_CODES
from fantasia_assets_tests.conftest import SAMPLE

FASTA = SAMPLE / "references.fasta.gz"
GAF = SAMPLE / "references.gaf.gz"
OBO = SAMPLE / "go-basic.obo.gz"
NEAR = SAMPLE / "references_near.h5"


def _records() -> list[tuple[str, str]]:
    """(accession, sequence) of the sample FASTA, in file order."""
    records: list[tuple[str, str]] = []
    for line in gzip.decompress(FASTA.read_bytes()).decode().splitlines():
        if line.startswith(">"):
            records.append((line[1:].split()[0], ""))
        elif line.strip():
            records[-1] = (records[-1][0], records[-1][1] + line.strip())
    return records


def _write_fasta(path: Path, records: list[tuple[str, str]]) -> Path:
    path.write_text("".join(f">{accession}\n{sequence}\n" for accession, sequence in records))
    return path


def _annotations(engine) -> list[tuple[str, str, str]]:
    with engine.connect() as conn:
        return [
            tuple(row)
            for row in conn.execute(
                sa.text(
                    "SELECT protein_id, go_id, evidence_code FROM protein_go_term_annotation ORDER BY 1, 2"
                )
            )
        ]


def _load_cli(*arguments) -> int:
    return cli.main(["load-references", *map(str, arguments)])


def test_fasta_with_no_records__load_refused_naming_the_file_and_nothing_changed(
    sample_loaded, tmp_path, capsys
):
    before = _annotations(sample_loaded)
    empty = tmp_path / "empty.fasta"
    empty.write_text("")
    assert _load_cli("--fasta", empty, "--gaf", GAF, "--obo", OBO) == 2
    assert f"error: {empty}: no FASTA records" in capsys.readouterr().err
    assert _annotations(sample_loaded) == before


def test_fasta_lacking_proteins_of_the_gaf__their_annotations_kept_and_named(sample_loaded, tmp_path, capsys):
    before = _annotations(sample_loaded)
    records = _records()
    missing = sorted(accession for accession, _ in records[-7:])
    partial = _write_fasta(tmp_path / "partial.fasta", records[:-7])
    assert _load_cli("--fasta", partial, "--gaf", GAF, "--obo", OBO) == 0
    out = capsys.readouterr().out
    assert _annotations(sample_loaded) == before  # nothing removed, from the 7 or from the others
    assert "removed" not in out
    named = [line for line in out.splitlines() if "GAF proteins without a FASTA sequence" in line]
    assert len(named) == 1 and named[0].startswith("skipped:      7 ")
    listed = named[0].split(": ", 2)[-1]
    assert listed.endswith(" and 2 more") and all(
        a in missing for a in listed[: -len(" and 2 more")].split(", ")
    )


def test_evidence_code_that_does_not_exist__load_refused_listing_the_known_codes(
    sample_loaded, tmp_path, capsys
):
    before = _annotations(sample_loaded)
    assert _load_cli("--fasta", FASTA, "--gaf", GAF, "--obo", OBO, "--evidence", "EXP,FOO") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --evidence: FOO is not a GO evidence code")
    assert " ".join(GO_EVIDENCE_CODES) in err and len(err.splitlines()) == 1
    assert _annotations(sample_loaded) == before


def test_evidence_codes_separated_by_a_space__read_as_a_list(sample_loaded, capsys):
    assert _load_cli("--fasta", FASTA, "--gaf", GAF, "--obo", OBO, "--evidence", "EXP IDA") == 0
    assert "evidence not in EXP,IDA" in capsys.readouterr().out
    kept = _annotations(sample_loaded)
    assert {code for _, _, code in kept} == {"EXP", "IDA"}
    assert len(kept) == 19 + 1176  # the sample's EXP and IDA annotations, one per (protein, term)


@pytest.mark.parametrize("others", [("--obo", OBO), ()], ids=["with_obo", "alone"])
def test_fasta_without_a_gaf__error_says_fasta_needs_gaf(database_url, tmp_path, capsys, others):
    fasta = _write_fasta(tmp_path / "new.fasta", _records()[:1])
    assert _load_cli("--fasta", fasta, *others) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {fasta}: loading --fasta needs --gaf") and len(err.splitlines()) == 1


def test_fasta_proteins_left_without_annotations__counted_and_named(engine, tmp_path, capsys):
    records = _records()
    extra = [("NOTINGAF1", "MKVLA"), ("NOTINGAF2", "MKVLW")]
    fasta = _write_fasta(tmp_path / "refs.fasta", records + extra)
    assert _load_cli("--fasta", fasta, "--gaf", GAF, "--obo", OBO, "--evidence", "EXP") == 0
    out = capsys.readouterr().out
    assert (
        "skipped:      2 FASTA proteins the GAF does not name, not loaded or changed: NOTINGAF1, NOTINGAF2"
        in out
    )
    with engine.connect() as conn:
        proteins = conn.execute(sa.text("SELECT count(*) FROM protein")).scalar()
    filtered = [line for line in out.splitlines() if "GAF lines were all filtered out" in line]
    assert len(filtered) == 1
    assert filtered[0].startswith(f"skipped:      {len(records) - proteins} ")
    assert filtered[0].endswith(f" and {len(records) - proteins - 5} more")


@pytest.mark.parametrize("layout", ["flat", "empty"])
def test_reference_hdf5_without_accession_groups__error_names_the_expected_layout(
    database_url, tmp_path, capsys, layout
):
    path = tmp_path / f"{layout}.h5"
    with h5py.File(path, "w") as handle:
        if layout == "flat":
            handle["A0AVF1"] = np.ones(256, dtype=np.float32)
    assert _load_cli("--embeddings", path, "--model", "NEAR") == 2
    error = capsys.readouterr().err.splitlines()[-1]
    assert error.startswith(
        f"error: {path}: no accession_<ID> groups (expected accession_<ID>/sequence and "
        "accession_<ID>/type_<id>/layer_<k>/embedding)"
    )
    assert error.endswith(
        "; found A0AVF1 (not an 'accession_<ID>' group)" if layout == "flat" else "; the file is empty"
    )


def test_embedded_proteins_and_gaf_terms_skipped__first_ones_named(engine, tmp_path):
    records = _records()
    fasta = _write_fasta(tmp_path / "refs.fasta", records[:10])
    report = load_references(engine, fasta=fasta, gaf=[GAF], obo=OBO, embeddings=NEAR, model="NEAR")
    lines = report.lines()
    with h5py.File(NEAR) as handle:
        in_file = [name[len("accession_") :] for name in handle]
    unknown = [accession for accession in in_file if accession not in dict(records[:10])]
    assert (
        f"skipped:      {len(unknown)} embedded proteins that are not reference proteins in the database: "
        f"{', '.join(unknown[:5])} and {len(unknown) - 5} more"
    ) in lines
    [obsolete] = [line for line in lines if "GAF lines: obsolete GO term" in line]
    assert obsolete.startswith("skipped:      17 GAF lines: obsolete GO term (")
    terms = obsolete.split("(", 1)[1].split(" GO terms: ", 1)[1].rstrip(")")
    assert all(term.startswith("GO:") for term in terms.split(" and ")[0].split(", "))


def test_embedded_proteins_whose_hdf5_sequence_differs__counted_and_named(engine, tmp_path):
    load_references(engine, fasta=FASTA, gaf=[GAF], obo=OBO, embeddings=NEAR, model="NEAR")
    changed = tmp_path / "near.h5"
    shutil.copy(NEAR, changed)
    with h5py.File(changed, "r+") as handle:
        names = sorted(handle)[:7]
        for name in names:
            sequence = handle[f"{name}/sequence"][()].decode()
            del handle[f"{name}/sequence"]
            handle[f"{name}/sequence"] = sequence + "W"
    report = load_references(engine, embeddings=changed, model="NEAR")
    accessions = [name[len("accession_") :] for name in names]
    assert (
        "skipped:      7 embedded proteins whose HDF5 sequence differs from the database's: "
        f"{', '.join(accessions[:5])} and 2 more"
    ) in report.lines()
