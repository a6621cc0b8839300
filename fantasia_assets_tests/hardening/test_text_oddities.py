"""Text as editors and tools write it: byte order marks, and one FASTA id given twice."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from fantasia_assets.db.sources import InputFileError, read_fasta, read_gaf, read_obo
from fantasia_assets_tests.conftest import SAMPLE

FASTA = SAMPLE / "references.fasta.gz"
GAF = SAMPLE / "references.gaf.gz"
OBO = SAMPLE / "go-basic.obo.gz"
BOM = b"\xef\xbb\xbf"


def _small_obo(path: Path, terms: int = 300) -> Path:
    """The sample OBO cut to its header and first `terms` stanzas, without links to the terms cut."""
    text = gzip.decompress(OBO.read_bytes()).decode()
    head, *stanzas = text.split("\n[Term]")
    kept = "".join("\n[Term]" + s.split("\n[Typedef]")[0] for s in stanzas[:terms])
    path.write_text(
        head + "\n".join(line for line in kept.split("\n") if not line.startswith("is_a:")) + "\n"
    )
    return path


def _with_bom(source: Path, target: Path, compress: bool) -> Path:
    data = source.read_bytes()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    data = BOM + data
    target.write_bytes(gzip.compress(data) if compress else data)
    return target


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "gzip"])
def test_byte_order_mark_in_fasta_gaf_or_obo__read_like_the_file_without_it(tmp_path, compress):
    obo = _small_obo(tmp_path / "small.obo")
    ontology = read_obo(obo)
    marked_obo = read_obo(_with_bom(obo, tmp_path / "bom.obo", compress))
    assert marked_obo.terms.equals(ontology.terms) and marked_obo.version == ontology.version
    assert read_fasta(_with_bom(FASTA, tmp_path / "bom.fasta", compress)).equals(read_fasta(FASTA))
    full = read_obo(OBO)
    plain = read_gaf([GAF], full)
    marked = read_gaf([_with_bom(GAF, tmp_path / "bom.gaf", compress)], full)
    assert marked.kept.equals(plain.kept) and marked.skipped == plain.skipped


def _fasta(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "refs.fasta"
    path.write_text(text)
    return path


def test_duplicate_fasta_ids_with_different_sequences__error_names_both_records(tmp_path):
    path = _fasta(tmp_path, ">sp|P1|A_HUMAN first\nMKVL\n>P2\nMAAA\n>P1 again\nMKVI\n")
    with pytest.raises(InputFileError) as error:
        read_fasta(path)
    assert str(error.value) == (
        f"{path}: records 'P1' at lines 1 and 5 have different sequences (4 and 4 residues); keep one of them"
    )


def test_duplicate_fasta_ids_with_the_same_sequence__kept_once(tmp_path):
    path = _fasta(tmp_path, ">P1\nMKVL\n>P2\nMAAA\n>P1 same residues, other line breaks\nMK\nvl\n")
    frame = read_fasta(path)
    assert frame.rows() == [("P1", "MKVL"), ("P2", "MAAA")]
