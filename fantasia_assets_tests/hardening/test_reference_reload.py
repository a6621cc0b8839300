"""Reloads that change what a loaded reference means: a new sequence, a second model name."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import h5py
import pytest
import sqlalchemy as sa

from fantasia_assets import cli
from fantasia_assets.db.loader import LoadError, load_references
from fantasia_assets_tests.conftest import SAMPLE

FASTA = SAMPLE / "references.fasta.gz"
GAF = SAMPLE / "references.gaf.gz"
OBO = SAMPLE / "go-basic.obo.gz"
NEAR = SAMPLE / "references_near.h5"


def _changed_fasta(tmp_path: Path) -> tuple[Path, str, str]:
    """The sample FASTA with one residue of its first protein changed: (path, accession, new sequence)."""
    lines = gzip.decompress(FASTA.read_bytes()).decode().split("\n")
    accession = lines[0][1:].split()[0]
    lines[1] = ("W" if lines[1][3] != "W" else "A").join((lines[1][:3], lines[1][4:]))
    path = tmp_path / "newer.fasta"
    path.write_text("\n".join(lines))
    return path, accession, lines[1]


def _embeddings_of(engine, accession: str) -> list[tuple[int, int]]:
    """(type id, layer) of the vectors the protein's current sequence has."""
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT e.embedding_type_id, e.layer_index FROM sequence_embeddings e "
                "JOIN protein p ON p.sequence_id = e.sequence_id WHERE p.id = :p ORDER BY 1, 2"
            ),
            {"p": accession},
        ).all()


def _orphans(engine) -> int:
    """Vectors of sequences that no protein has: what the search can never reach."""
    with engine.connect() as conn:
        return conn.execute(
            sa.text(
                "SELECT count(*) FROM sequence_embeddings e "
                "WHERE NOT EXISTS (SELECT 1 FROM protein p WHERE p.sequence_id = e.sequence_id)"
            )
        ).scalar()


def test_reload_with_a_changed_reference_sequence__protein_named_and_stale_vectors_removed(
    engine, tmp_path, capsys
):
    load_references(engine, fasta=FASTA, gaf=[GAF], obo=OBO, embeddings=NEAR, model="NEAR")
    newer, accession, sequence = _changed_fasta(tmp_path)
    assert cli.main(["load-references", "--fasta", str(newer), "--gaf", str(GAF), "--obo", str(OBO)]) == 0
    out = capsys.readouterr().out
    assert (
        f"changed:      1 proteins have a new sequence ({accession}); 3 embeddings of their old sequences removed"
        in out
    )
    assert (
        "warning:      out of the search until embeddings of their new sequence are loaded "
        f"(--embeddings … --model …): {accession} (NEAR)"
    ) in out
    assert _embeddings_of(engine, accession) == [] and _orphans(engine) == 0

    # its new vectors, loaded afterwards, bring it back
    embeddings = tmp_path / "near.h5"
    shutil.copy(NEAR, embeddings)
    with h5py.File(embeddings, "r+") as handle:
        del handle[f"accession_{accession}/sequence"]
        handle[f"accession_{accession}/sequence"] = sequence
    report = load_references(engine, embeddings=embeddings, model="NEAR")
    assert sum(change.inserted for change in report.embeddings_by_layer.values()) == 3
    assert _embeddings_of(engine, accession) == [(1, 0), (1, 1), (1, 4)]


def test_reload_with_a_changed_sequence_and_its_new_vectors__nothing_reported_missing(engine, tmp_path):
    load_references(engine, fasta=FASTA, gaf=[GAF], obo=OBO, embeddings=NEAR, model="NEAR")
    newer, accession, sequence = _changed_fasta(tmp_path)
    embeddings = tmp_path / "near.h5"
    shutil.copy(NEAR, embeddings)
    with h5py.File(embeddings, "r+") as handle:
        del handle[f"accession_{accession}/sequence"]
        handle[f"accession_{accession}/sequence"] = sequence
    report = load_references(engine, fasta=newer, gaf=[GAF], obo=OBO, embeddings=embeddings, model="NEAR")
    assert report.changed_sequences == [accession] and report.stale_embeddings == 3
    assert report.without_embeddings == []
    assert _embeddings_of(engine, accession) == [(1, 0), (1, 1), (1, 4)] and _orphans(engine) == 0


def test_sequence_changed_then_changed_back__the_protein_is_named_out_of_the_search_both_times(
    engine, tmp_path
):
    load_references(engine, fasta=FASTA, gaf=[GAF], obo=OBO, embeddings=NEAR, model="NEAR")
    newer, accession, _ = _changed_fasta(tmp_path)
    changed = load_references(engine, fasta=newer, gaf=[GAF], obo=OBO)
    assert changed.without_embeddings == [(accession, "NEAR")]
    # back to the first sequence, whose vectors the change removed: still out of the search
    back = load_references(engine, fasta=FASTA, gaf=[GAF], obo=OBO)
    assert back.changed_sequences == [accession] and back.stale_embeddings == 0
    assert back.without_embeddings == [(accession, "NEAR")]
    assert _embeddings_of(engine, accession) == []
    # its vectors loaded again bring it back, and the next reload reports nothing missing
    load_references(engine, embeddings=NEAR, model="NEAR")
    assert _embeddings_of(engine, accession) == [(1, 0), (1, 1), (1, 4)]
    assert load_references(engine, fasta=FASTA, gaf=[GAF], obo=OBO).without_embeddings == []


def test_same_vectors_under_a_second_model_name__error_suggests_only_what_works(engine):
    load_references(engine, fasta=FASTA, gaf=[GAF], obo=OBO, embeddings=NEAR, model="NEAR")
    with pytest.raises(LoadError) as error:
        load_references(engine, embeddings=NEAR, model="NEAR-copy")
    message = str(error.value)
    assert "type_1 is already the id of model 'NEAR'" in message and "--model 'NEAR'" in message
    assert "--type-id" not in message
    # what the message suggests works: the same vectors under the first name change nothing
    report = load_references(engine, embeddings=NEAR, model="NEAR")
    assert all(c.inserted == c.updated == 0 for c in report.embeddings_by_layer.values())
    # and a --type-id the file lacks says which ids it has
    with pytest.raises(LoadError, match=r"no type_7 groups for model 'NEAR-copy' \(the file has type_1\)"):
        load_references(engine, embeddings=NEAR, model="NEAR-copy", type_id=7)
