"""HDF5 objects of the wrong kind or shape, and query vectors without a direction: left out with
the reason, at load and at lookup, never a traceback and never silently reshaped."""

from __future__ import annotations

import logging
import shutil

import h5py
import numpy as np
import polars as pl
import pytest

from fantasia_assets.config import parse_config
from fantasia_assets.db.loader import load_references
from fantasia_assets.runner import run_lookup
from fantasia_assets_tests.conftest import SAMPLE
from fantasia_assets_tests.hardening.helpers import config_dict, near_only, sample_groups, write_queries

FASTA = SAMPLE / "references.fasta.gz"
GAF = SAMPLE / "references.gaf.gz"
OBO = SAMPLE / "go-basic.obo.gz"
NEAR = SAMPLE / "references_near.h5"
TYPE_AS_DATASET = "not a group of layer_<k> groups (a dataset?)"
MATRIX = "embedding has shape (16, 16), expected a 1-D vector"


def _skipped(experiment) -> list[tuple]:
    frame = pl.read_csv(experiment / "skipped_queries.csv", schema_overrides={"partition": pl.String})
    return [tuple("" if v is None else v for v in row) for row in frame.rows()]


def _shards(experiment) -> set[str]:
    return {p.stem for p in (experiment / "raw_results" / "NEAR" / "layer_0").glob("*.csv")}


def _type_as_dataset(content: dict) -> tuple[dict, str, str]:
    vector = content["type_1/layer_0/embedding"]
    kept = {k: v for k, v in content.items() if not k.startswith("type_1/")}
    return {**kept, "type_1": vector}, "/type_1", TYPE_AS_DATASET


def _matrix(content: dict) -> tuple[dict, str, str]:
    matrix = content["type_1/layer_0/embedding"].reshape(16, 16)
    return {**content, "type_1/layer_0/embedding": matrix}, "/type_1/layer_0/embedding", MATRIX


def test_query_hdf5_object_of_the_wrong_kind_or_shape__left_out_with_the_reason(
    sample_loaded, tmp_path, caplog
):
    groups = sample_groups(4)
    expected = []
    for index, edit in ((1, _type_as_dataset), (2, _matrix)):
        bad = groups[index][0]
        content, where, reason = edit(groups[index][1])
        groups[index] = (bad, content)
        expected.append((bad, where, reason))
    queries = write_queries(tmp_path / "queries.h5", groups)
    experiment = tmp_path / "experiment"
    with caplog.at_level(logging.WARNING):
        run_lookup(parse_config(config_dict(experiment, queries, **near_only([0]))), sample_loaded)
    for bad, where, reason in expected:
        assert f"{queries}: skipped {bad}{where}: {reason}" in caplog.text
    assert _skipped(experiment) == [(f"{bad}{where}", "", reason) for bad, where, reason in expected] + [
        (bad, "NEAR|layer_0", "no type_1/layer_0 embedding") for bad, _, _ in expected
    ]
    assert _shards(experiment) == {name[len("accession_") :] for name, _ in (groups[0], groups[3])}


def _reference_copy(tmp_path, change):
    path = tmp_path / "near.h5"
    shutil.copy(NEAR, path)
    with h5py.File(path, "r+") as handle:
        change(handle[sorted(handle)[5]])
    return path


def _replace_type_group(group: h5py.Group) -> None:
    vector = group["type_1/layer_0/embedding"][()]
    del group["type_1"]
    group["type_1"] = vector


def _replace_with_matrix(group: h5py.Group) -> None:
    vector = group["type_1/layer_0/embedding"][()]
    del group["type_1/layer_0/embedding"]
    group["type_1/layer_0/embedding"] = vector.reshape(16, 16)


@pytest.mark.parametrize(
    "change, reason, layers_lost",
    [(_replace_type_group, TYPE_AS_DATASET, {0, 1, 4}), (_replace_with_matrix, MATRIX, {0})],
    ids=["type_as_dataset", "matrix_16x16"],
)
def test_reference_hdf5_object_of_the_wrong_kind_or_shape__load_skips_it_with_the_reason(
    engine, tmp_path, change, reason, layers_lost
):
    path = _reference_copy(tmp_path, change)
    report = load_references(engine, fasta=FASTA, gaf=[GAF], obo=OBO, embeddings=path, model="NEAR")
    assert report.skipped[f"HDF5 groups: {reason}"] == 1
    plain = load_references(engine, embeddings=NEAR, model="NEAR")
    # the plain file adds exactly the skipped vectors; nothing else was missing or reshaped
    for layer, change_ in plain.embeddings_by_layer.items():
        assert change_.inserted == (1 if layer in layers_lost else 0)
        assert change_.updated == 0


def test_zero_query_vector_under_cosine__left_out_with_the_reason(sample_loaded, tmp_path, caplog):
    groups = sample_groups(4)
    flat = [groups[1][0], groups[2][0]]
    for index, scale in ((1, 0.0), (2, 1e-42)):  # zero, and too small to normalise in float32
        vector = groups[index][1]["type_1/layer_0/embedding"]
        groups[index][1]["type_1/layer_0/embedding"] = (np.sign(vector) * scale).astype(np.float32)
    queries = write_queries(tmp_path / "queries.h5", groups)
    cosine, euclidean = tmp_path / "cosine", tmp_path / "euclidean"
    with caplog.at_level(logging.WARNING):
        result = run_lookup(parse_config(config_dict(cosine, queries, **near_only([0]))), sample_loaded)
    reason = "type_1/layer_0 is a zero vector (or too close to zero): no direction, so no cosine distance"
    for bad in flat:
        assert f"{bad} left out of NEAR|layer_0: {reason}" in caplog.text
    assert _skipped(cosine) == [(bad, "NEAR|layer_0", reason) for bad in flat]
    assert _shards(cosine) == {name[len("accession_") :] for name, _ in (groups[0], groups[3])}
    assert result.partitions[0].skipped == 2
    # a distance from the origin is still a distance: euclidean searches them
    run_lookup(
        parse_config(
            config_dict(euclidean, queries, **near_only([0]), **{"lookup.distance_metric": "euclidean"})
        ),
        sample_loaded,
    )
    assert _skipped(euclidean) == []
    assert _shards(euclidean) == {name[len("accession_") :] for name, _ in groups}


def test_query_group_without_an_id_or_with_several_sequences__left_out_with_the_reason(
    sample_loaded, tmp_path, caplog
):
    groups = sample_groups(4)
    # no id after the prefix: its outputs would have no name
    groups[1] = ("accession_", groups[1][1])
    # two strings in 'sequence': which one is the protein's would be a guess
    several = groups[2][0]
    groups[2] = (several, {**groups[2][1], "sequence": [groups[2][1]["sequence"], "MKV"]})
    queries = write_queries(tmp_path / "queries.h5", groups)
    experiment = tmp_path / "experiment"
    with caplog.at_level(logging.WARNING):
        run_lookup(parse_config(config_dict(experiment, queries, **near_only([0]))), sample_loaded)
    empty = "an empty accession (nothing after 'accession_')"
    assert f"{queries}: skipped accession_: {empty}" in caplog.text
    skipped = dict((group, reason) for group, _, reason in _skipped(experiment))
    assert skipped["accession_"] == empty
    assert skipped[several] == "unreadable 'sequence' dataset (holds 2 strings, not one)"
    assert _shards(experiment) == {name[len("accession_") :] for name, _ in (groups[0], groups[3])}
    summary = pl.read_csv(experiment / "summary.csv")
    assert "" not in set(summary["accession"].fill_null(""))
