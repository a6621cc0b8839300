"""The CLI over a corpus of bad input files: one `error:` line (exit 2) or a clean run, never a
Python traceback; `-v` shows the traceback for debugging."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np

from fantasia_assets import cli
from fantasia_assets_tests.conftest import PROJECT
from fantasia_assets_tests.hardening.helpers import (
    config_dict,
    near_only,
    sample_groups,
    write_config,
    write_queries,
)

# a consistent tiny reference set, so that the one bad file is the only thing wrong
_OBO = "format-version: 1.2\n\n[Term]\nid: GO:0000001\nname: one\nnamespace: biological_process\n"
_GAF = "\t".join(["UniProtKB", "P1", "G", "", "GO:0000001", "ref", "EXP", "", "P", "n", "", "protein",
                  "taxon:9606", "20200101", "UniProt", "", ""]) + "\n"  # fmt: skip
_FASTA = ">P1\nMKVLA\n"


def _h5_references(path: Path, change=None) -> Path:
    with h5py.File(path, "w") as out:
        group = out.create_group("accession_P1")
        group.create_dataset("sequence", data="MKVLA", dtype=h5py.string_dtype())
        group.create_dataset("type_1/layer_0/embedding", data=np.arange(1, 9, dtype=np.float32))
        if change is not None:
            change(group)
    return path


def _type_dataset(group) -> None:
    del group["type_1"]
    group["type_1"] = np.ones(8, dtype=np.float32)


def _matrix(group) -> None:
    del group["type_1/layer_0/embedding"]
    group["type_1/layer_0/embedding"] = np.ones((4, 2), dtype=np.float32)


# name → (which input it replaces, how to make it)
LOAD_CORPUS = {
    "fasta_binary": ("fasta", lambda p: p.write_bytes(bytes(range(256)) * 4)),
    "fasta_latin1": ("fasta", lambda p: p.write_bytes(">P1 café\nMKV\n".encode("latin-1"))),
    "fasta_truncated_gzip": ("fasta", lambda p: p.write_bytes(gzip.compress(_FASTA.encode() * 50)[:30])),
    "fasta_foreign_letter": ("fasta", lambda p: p.write_text(">P1\nMKV#LA\n")),
    "fasta_duplicate_id": ("fasta", lambda p: p.write_text(">P1\nMKVLA\n>P1\nMKVLW\n")),
    "fasta_only_headers": ("fasta", lambda p: p.write_text(">P1\n>P2\n")),
    "fasta_is_a_folder": ("fasta", lambda p: p.mkdir()),
    "fasta_missing": ("fasta", lambda p: None),
    "gaf_wrong_columns": ("gaf", lambda p: p.write_text("UniProtKB\tP1\tG\n")),
    "gaf_binary": ("gaf", lambda p: p.write_bytes(b"\x00\xff\xfe" * 100)),
    "gaf_with_bom": ("gaf", lambda p: p.write_bytes(b"\xef\xbb\xbf" + _GAF.encode())),
    "obo_without_terms": ("obo", lambda p: p.write_text("format-version: 1.2\n")),
    "obo_dangling_parent": ("obo", lambda p: p.write_text(_OBO + "is_a: GO:0000404 ! gone\n")),
    "obo_binary_with_term": ("obo", lambda p: p.write_bytes(b"[Term]\n" + bytes(range(256)))),
    "embeddings_not_hdf5": ("embeddings", lambda p: p.write_text(_FASTA)),
    "embeddings_empty_file": ("embeddings", lambda p: p.write_bytes(b"")),
    "embeddings_type_as_dataset": ("embeddings", lambda p: _h5_references(p, _type_dataset)),
    "embeddings_matrix": ("embeddings", lambda p: _h5_references(p, _matrix)),
    "embeddings_is_a_folder": ("embeddings", lambda p: p.mkdir()),
}


def _check_one_error_line_or_success(code: int, captured, case: str) -> None:
    assert "Traceback" not in captured.err + captured.out, case
    assert code in (0, 2), case
    if code == 2:
        # progress lines may come first; the error is the last thing said, indented lines after it
        lines = captured.err.splitlines()
        [start] = [i for i, line in enumerate(lines) if line.startswith("error: ")]
        assert all(line.startswith("  ") for line in lines[start + 1 :]), (case, captured.err)


def test_bad_reference_files_to_load_references__one_error_line_or_a_clean_load(
    database_url, tmp_path, capsys
):
    # one database for the whole corpus: a bad file is refused before anything is written
    for case, (kind, make) in sorted(LOAD_CORPUS.items()):
        folder = tmp_path / case
        folder.mkdir()
        files = {"fasta": folder / "refs.fasta", "gaf": folder / "refs.gaf", "obo": folder / "go.obo"}
        files["fasta"].write_text(_FASTA)
        files["gaf"].write_text(_GAF)
        files["obo"].write_text(_OBO)
        files["embeddings"] = _h5_references(folder / "refs.h5")
        bad = folder / f"bad-{kind}"
        make(bad)
        files[kind] = bad
        arguments = [arg for k, v in files.items() for arg in (f"--{k}", str(v))]
        code = cli.main(["load-references", "--model", "M", *arguments])
        captured = capsys.readouterr()
        _check_one_error_line_or_success(code, captured, case)
        if code == 2:
            assert str(bad) in captured.err, case


def _queries_with(change) -> list:
    groups = sample_groups(3)
    change(groups)
    return groups


def _numeric_sequence(groups) -> None:
    groups[0] = (groups[0][0], {**groups[0][1], "sequence": np.arange(3)})


# not HDF5, empty and truncated files are test_bad_queries' cases
QUERY_CORPUS = {
    "is_a_folder": lambda p: p.mkdir(),
    "numeric_sequence": lambda p: _write_raw_queries(p, _queries_with(_numeric_sequence)),
    "only_zero_vectors": lambda p: write_queries(p, _queries_with(_zero_vectors)),
}


def _zero_vectors(groups) -> None:
    for _, content in groups:
        content["type_1/layer_0/embedding"] = np.zeros(256, dtype=np.float32)


def _write_raw_queries(path: Path, groups) -> None:
    with h5py.File(path, "w") as out:
        for name, content in groups:
            for key, value in content.items():
                out.create_dataset(f"{name}/{key}", data=value)


def test_bad_query_files_to_lookup__one_error_line_or_a_clean_run(sample_loaded, tmp_path, capsys):
    for case, make in sorted(QUERY_CORPUS.items()):
        queries = tmp_path / f"{case}.h5"
        make(queries)
        raw = config_dict(tmp_path / f"experiment-{case}", queries, **near_only([0]))
        config = write_config(tmp_path / f"{case}.yaml", raw)
        code = cli.main(["lookup", "--config", str(config)])
        _check_one_error_line_or_success(code, capsys.readouterr(), case)


def test_error_with_verbose_flag__traceback_shown_only_then(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "FANTASIA_HOME": str(tmp_path / "home")}
    command = [sys.executable, "-m", "fantasia_assets.cli"]
    missing = str(tmp_path / "missing.yaml")
    plain = subprocess.run([*command, "lookup", "--config", missing], env=env, capture_output=True, text=True)
    verbose = subprocess.run(
        [*command, "-v", "lookup", "--config", missing], env=env, capture_output=True, text=True
    )
    assert plain.returncode == verbose.returncode == 2
    assert plain.stderr == f"error: {missing}: no such configuration file\n"
    assert "Traceback (most recent call last)" in verbose.stderr
    assert verbose.stderr.endswith(f"error: {missing}: no such configuration file\n")
    # where people add it: after the command, and after a nested one
    after = subprocess.run(
        [*command, "lookup", "--config", missing, "-v"], env=env, capture_output=True, text=True
    )
    assert after.returncode == 2 and after.stderr == verbose.stderr.replace(" -v", "")
    nested = subprocess.run([*command, "db", "stop", "--verbose"], env=env, capture_output=True, text=True)
    assert nested.returncode == 0, nested.stderr
