"""Property tests of the input parsers: whatever the bytes, a result, a documented skip or a clear
error (a FantasiaError naming the file), never another exception and never a hang.

Each property runs a bounded number of examples under a deadline, derandomised so CI runs the
same examples every time.
"""

from __future__ import annotations

import gzip
import re
from datetime import timedelta
from pathlib import Path

import h5py
import numpy as np
import polars as pl
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fantasia_assets.config import ConfigError, load_config
from fantasia_assets.core.queries import EmbeddingFileError, scan
from fantasia_assets.core.sequences import clean
from fantasia_assets.db.sources import InputFileError, Ontology, read_fasta, read_gaf, read_obo
from fantasia_assets.errors import FantasiaError

PROPERTY = settings(
    max_examples=40,
    deadline=timedelta(seconds=5),
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
BOM = b"\xef\xbb\xbf"


def _write(path: Path, data: bytes, compress: bool) -> Path:
    path.write_bytes(gzip.compress(data, mtime=0) if compress else data)
    return path


def _expect_clear(error: BaseException, path: Path) -> None:
    assert isinstance(error, FantasiaError), repr(error)
    assert str(path) in str(error) and "\n" not in str(error)


# ---------------------------------------------------------------------------------------------
# FASTA

_RESIDUES = st.text(alphabet="ACDEFGHIKLMNPQRSTVWYXBZUO*acdefg-. 0123456789\t#>é", max_size=40)
_IDS = st.text(alphabet="ABPQ0123|_-sptr", min_size=0, max_size=8)


@st.composite
def _fasta_texts(draw) -> bytes:
    records = draw(st.lists(st.tuples(_IDS, st.lists(_RESIDUES, max_size=4)), max_size=6))
    lines = []
    if draw(st.booleans()):
        lines.append(draw(_RESIDUES))  # text before the first header
    for identifier, chunks in records:
        lines.append(">" + identifier + draw(st.sampled_from(["", " description", "\t"])))
        lines.extend(chunks)
    end = draw(st.sampled_from(["\n", "\r\n", "\r"]))
    data = end.join(lines).encode("utf-8")
    return (BOM if draw(st.booleans()) else b"") + data


def _check_fasta(path: Path) -> None:
    try:
        frame = read_fasta(path)
    except FantasiaError as error:
        _expect_clear(error, path)
        assert isinstance(error, InputFileError)
        return
    assert frame["accession"].is_unique().all()
    for sequence in frame["sequence"]:
        assert re.fullmatch(r"[A-Z*]+", sequence) and clean(sequence) == sequence, sequence


@PROPERTY
@given(data=st.binary(max_size=600), compress=st.booleans())
def test_arbitrary_bytes_as_fasta__a_result_or_a_clear_error(tmp_path, data, compress):
    _check_fasta(_write(tmp_path / "refs.fasta", data, compress))


@PROPERTY
@given(data=_fasta_texts(), compress=st.booleans(), cut=st.integers(0, 40))
def test_fasta_with_structured_mutations__a_result_or_a_clear_error(tmp_path, data, compress, cut):
    path = _write(tmp_path / "refs.fasta", data, compress)
    if compress and cut:  # a truncated download
        path.write_bytes(path.read_bytes()[:-cut])
    _check_fasta(path)


# ---------------------------------------------------------------------------------------------
# GAF

_ONTOLOGY = Ontology(
    terms=pl.DataFrame(
        {"go_id": ["GO:0000001", "GO:0000002"], "category": ["P", "F"], "description": ["a", "b"]}
    ),
    primary={"GO:0000001": "GO:0000001", "GO:0000002": "GO:0000002", "GO:0000009": "GO:0000001"},
    obsolete={"GO:0000003"},
    version="test",
)
_CELLS = st.sampled_from(
    ["", "UniProtKB", "P1", "P2", "NOT", "NOT|enables", "GO:0000001", "GO:0000002", "GO:0000003",
     "GO:0000009", "GO:1", "EXP", "IDA", "IEA", "P", "F", "C", "taxon:9606", "taxon:1|taxon:2",
     "20200101", "é", "\x00", "!", " "]
)  # fmt: skip


@st.composite
def _gaf_texts(draw) -> bytes:
    lines = ["!gaf-version: 2.2"] if draw(st.booleans()) else []
    for _ in range(draw(st.integers(0, 6))):
        width = draw(st.sampled_from([17, 17, 17, 16, 15, 18, 1, 30]))
        lines.append("\t".join(draw(st.lists(_CELLS, min_size=width, max_size=width))))
    end = draw(st.sampled_from(["\n", "\r\n"]))
    return (BOM if draw(st.booleans()) else b"") + end.join(lines).encode("utf-8")


def _check_gaf(path: Path) -> None:
    try:
        annotations = read_gaf([path], _ONTOLOGY)
    except FantasiaError as error:
        _expect_clear(error, path)
        return
    kept = annotations.kept
    assert set(kept["go_id"]) <= {"GO:0000001", "GO:0000002"}
    assert kept.select("protein_id", "go_id").is_unique().all()


@PROPERTY
@given(data=st.binary(max_size=600), compress=st.booleans())
def test_arbitrary_bytes_as_gaf__a_result_or_a_clear_error(tmp_path, data, compress):
    _check_gaf(_write(tmp_path / "refs.gaf", data, compress))


@PROPERTY
@given(data=_gaf_texts(), compress=st.booleans())
def test_gaf_with_structured_mutations__a_result_or_a_clear_error(tmp_path, data, compress):
    _check_gaf(_write(tmp_path / "refs.gaf", data, compress))


# ---------------------------------------------------------------------------------------------
# OBO

_OBO_LINES = st.sampled_from(
    ["id: GO:0000001", "id: GO:0000002", "id: GO:0000001", "id:", "name: a term", "name:",
     "namespace: biological_process", "namespace: molecular_function", "namespace: nonsense",
     "alt_id: GO:0000009", "is_a: GO:0000001 ! a term", "is_a: GO:0000404", "is_obsolete: true",
     "def: \"text\" []", "def: \"unclosed", "[Term]", "[Typedef]", "relationship: part_of GO:0000002",
     "format-version: 1.2", "data-version: releases/2026-01-01", "!", "é", "\x00", ""]
)  # fmt: skip


@st.composite
def _obo_texts(draw) -> bytes:
    lines = draw(st.lists(_OBO_LINES, max_size=25))
    return ("[Term]\n" + "\n".join(lines) + "\n").encode("utf-8")


def _check_obo(path: Path) -> None:
    try:
        ontology = read_obo(path)
    except FantasiaError as error:
        _expect_clear(error, path)
        return
    assert set(ontology.primary.values()) <= set(ontology.terms["go_id"])
    assert not set(ontology.primary) & ontology.obsolete


@PROPERTY
@given(data=st.binary(max_size=400), compress=st.booleans(), term=st.booleans())
def test_arbitrary_bytes_as_obo__a_result_or_a_clear_error(tmp_path, data, compress, term):
    # with a [Term] somewhere, the bytes get past the first check into goatools itself
    _check_obo(_write(tmp_path / "go.obo", (b"[Term]\n" if term else b"") + data, compress))


@PROPERTY
@given(data=_obo_texts(), compress=st.booleans())
def test_obo_with_structured_mutations__a_result_or_a_clear_error(tmp_path, data, compress):
    _check_obo(_write(tmp_path / "go.obo", data, compress))


# ---------------------------------------------------------------------------------------------
# HDF5 embedding catalogue


def _check_catalogue(path: Path) -> None:
    """Scan, then read every (type, layer) both ways: results, skips with reasons, or clear errors."""
    try:
        catalogue = scan(path, workers=1)
    except FantasiaError as error:
        _expect_clear(error, path)
        assert isinstance(error, EmbeddingFileError)
        return
    assert len(catalogue.accessions) == len(catalogue.sequences)
    assert all(isinstance(reason, str) and reason for _, reason in catalogue.skipped)
    for key in catalogue.layers:
        for metric in ("cosine", "euclidean"):
            try:
                vectors, rows, skipped = catalogue.read_valid(key, metric=metric)
            except FantasiaError as error:
                _expect_clear(error, path)
                continue
            assert len(vectors) == len(rows) and np.isfinite(vectors).all()
            assert all(reason for _, reason in skipped)
        try:
            catalogue.read(key)
        except FantasiaError as error:
            _expect_clear(error, path)


_DTYPES = st.sampled_from(["<f4", "<f8", ">f4", "<f2", "<i4", "S4"])
_SHAPES = st.sampled_from([(8,), (8,), (1, 8), (8, 1), (4, 2), (), (0,), (7,)])


@st.composite
def _hdf5_groups(draw) -> list[tuple[str, dict]]:
    groups = []
    for index in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(["accession_P", "accession_Q|1", "other_", "accession_"])) + str(index)
        content: dict = {}
        sequence = draw(st.sampled_from(["MKV", "", "mk-v 1", "MK#", None, 7, "group"]))
        if sequence is not None:
            content["sequence"] = sequence
        for type_id in draw(st.lists(st.sampled_from([1, 2]), max_size=2, unique=True)):
            kind = draw(st.sampled_from(["layers", "layers", "legacy", "dataset"]))
            if kind == "dataset":
                content[f"type_{type_id}"] = ("vector", "<f4", (8,), False, 1.0)
                continue
            layers = (
                [None] if kind == "legacy" else draw(st.lists(st.integers(0, 2), max_size=2, unique=True))
            )
            for layer in layers:
                key = (
                    f"type_{type_id}/embedding"
                    if layer is None
                    else f"type_{type_id}/layer_{layer}/embedding"
                )
                value = draw(st.sampled_from([1.0, 0.0, np.nan, np.inf, 1e-42, 7e4]))
                content[key] = ("vector", draw(_DTYPES), draw(_SHAPES), draw(st.booleans()), value)
        groups.append((name, content))
    return groups


def _write_hdf5(path: Path, groups: list[tuple[str, dict]]) -> Path:
    with h5py.File(path, "w") as out:
        for name, content in groups:
            group = out.create_group(name)
            for key, value in content.items():
                if key == "sequence" and value == "group":
                    group.create_group("sequence")
                elif key == "sequence" and isinstance(value, str):
                    group.create_dataset("sequence", data=value, dtype=h5py.string_dtype())
                elif key == "sequence":
                    group.create_dataset("sequence", data=value)
                else:
                    _, dtype, shape, chunked, fill = value
                    data = np.full(shape, fill if dtype[1] == "f" else 1).astype(dtype)
                    chunks = chunked and data.ndim > 0 and data.size > 0
                    group.create_dataset(key, data=data, chunks=True if chunks else None)
    return path


@PROPERTY
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_as_hdf5__a_result_or_a_clear_error(tmp_path, data):
    _check_catalogue(_write(tmp_path / "queries.h5", data, False))


@PROPERTY
@given(groups=_hdf5_groups())
def test_hdf5_with_structured_mutations__a_result_or_a_clear_error(tmp_path, groups):
    _check_catalogue(_write_hdf5(tmp_path / "queries.h5", groups))


@pytest.fixture(scope="module")
def small_hdf5(tmp_path_factory) -> bytes:
    """A valid three-protein query file, whose bytes the next property damages."""
    groups = [
        (
            f"accession_P{i}",
            {"sequence": "MKVL", "type_1/layer_0/embedding": ("vector", "<f4", (8,), i == 2, 1.0)},
        )
        for i in range(3)
    ]
    return _write_hdf5(tmp_path_factory.mktemp("h5") / "small.h5", groups).read_bytes()


@PROPERTY
@given(
    damage=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=8)
)
def test_hdf5_with_damaged_bytes__a_result_or_a_clear_error(tmp_path, small_hdf5, damage):
    data = bytearray(small_hdf5)
    for where, value in damage:
        data[int(where * len(data))] = value
    _check_catalogue(_write(tmp_path / "queries.h5", bytes(data), False))


# ---------------------------------------------------------------------------------------------
# the configuration file

_SAMPLE_CONFIG = Path(__file__).resolve().parents[2] / "data" / "config.yaml"
_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)


def _check_config(path: Path) -> None:
    try:
        config = load_config(path)
    except FantasiaError as error:
        _expect_clear(error, path)
        assert isinstance(error, ConfigError)
        return
    assert config.enabled_models() is not None and config.precision >= 0


@st.composite
def _config_mutations(draw) -> dict:
    """The sample configuration with a few keys removed, replaced by any YAML value, or added."""
    config = yaml.safe_load(_SAMPLE_CONFIG.read_text())
    for _ in range(draw(st.integers(1, 3))):
        node, path = config, []
        while isinstance(node, dict) and node and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(node, key=str)))
            path.append(key)
            if not isinstance(node[key], dict):
                break
            node = node[key]
        parent = config
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "add" or not path:
            parent[draw(st.text(max_size=8))] = draw(_VALUES)
        elif action == "remove":
            parent.pop(path[-1], None)
        else:
            parent[path[-1]] = draw(_VALUES)
    return config


@PROPERTY
@given(data=st.binary(max_size=600))
def test_arbitrary_bytes_as_configuration__a_result_or_a_clear_error(tmp_path, data):
    _check_config(_write(tmp_path / "config.yaml", data, False))


@PROPERTY
@given(config=_config_mutations())
def test_configuration_with_structured_mutations__a_result_or_a_clear_error(tmp_path, config):
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    _check_config(path)
