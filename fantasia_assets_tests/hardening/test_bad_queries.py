"""Bad query files: a clear message naming file, group and reason; good queries still annotated;
nothing already written damaged."""

from __future__ import annotations

import logging
from pathlib import Path

import dagster as dg
import h5py
import numpy as np
import polars as pl
import pytest

from fantasia_assets import cli
from fantasia_assets.config import parse_config
from fantasia_assets.core.plan import LookupPlanError
from fantasia_assets.runner import run_lookup
from fantasia_assets_tests.hardening.helpers import (
    SAMPLE_QUERIES,
    config_dict,
    hidden,
    near_only,
    sample_groups,
    tree,
    write_config,
    write_queries,
)


def _shard_accessions(experiment: Path, model: str, layer: int) -> set[str]:
    shards = experiment / "raw_results" / model / f"layer_{layer}"
    return {p.stem for p in shards.glob("*.csv")}


def _skipped(experiment: Path) -> pl.DataFrame:
    return pl.read_csv(experiment / "skipped_queries.csv", schema_overrides={"partition": pl.String})


@pytest.fixture()
def earlier_run(sample_loaded, tmp_path):
    """A finished NEAR lookup in tmp_path/experiment, and the digest of its files."""
    experiment = tmp_path / "experiment"
    run_lookup(parse_config(config_dict(experiment, **near_only([0]))), sample_loaded)
    return experiment, tree(experiment)


def _not_hdf5(path: Path) -> None:
    path.write_text(">sp|P12345|X\nMKV\n")


def _truncated(path: Path) -> None:
    data = SAMPLE_QUERIES.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])


def _zero_bytes(path: Path) -> None:
    path.write_bytes(b"")


def _no_groups(path: Path) -> None:
    with h5py.File(path, "w") as handle:
        handle.attrs["model"] = "none"


def _only_groups_without_sequence(path: Path) -> None:
    with h5py.File(path, "w") as handle:
        handle.create_dataset("accession_P1/type_1/layer_0/embedding", data=np.ones(256, dtype=np.float32))


@pytest.mark.parametrize(
    "make, message",
    [
        (_not_hdf5, "not a readable HDF5 file"),
        (_truncated, "not a readable HDF5 file"),
        (_zero_bytes, "not a readable HDF5 file"),
        (_no_groups, "no query proteins"),
        (_only_groups_without_sequence, "first accession_P1: no 'sequence' dataset"),
    ],
    ids=["not_hdf5", "truncated", "zero_bytes", "no_groups", "no_sequences"],
)
def test_unusable_query_file__error_names_the_file_and_earlier_outputs_stay(
    earlier_run, tmp_path, capsys, make, message
):
    experiment, before = earlier_run
    queries = tmp_path / "queries.h5"
    make(queries)
    config = write_config(tmp_path / "config.yaml", config_dict(experiment, queries, **near_only([0])))
    assert cli.main(["lookup", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(queries) in err and message in err
    assert "Traceback" not in err
    assert tree(experiment) == before


def test_groups_without_sequence__skipped_by_name_and_the_others_annotated(sample_loaded, tmp_path, caplog):
    groups = sample_groups(6)
    del groups[2][1]["sequence"]
    queries = write_queries(tmp_path / "queries.h5", groups)
    experiment = tmp_path / "experiment"
    run_lookup(parse_config(config_dict(experiment, queries, **near_only([0]))), sample_loaded)
    bad = groups[2][0]
    assert f"{queries}: skipped {bad}: no 'sequence' dataset" in caplog.text
    good = {name[len("accession_") :] for name, _ in groups} - {bad[len("accession_") :]}
    assert _shard_accessions(experiment, "NEAR", 0) == good
    assert _skipped(experiment).rows() == [(bad, "", "no 'sequence' dataset")]


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "minus_inf"])
def test_nan_or_inf_in_a_query_vector__that_query_left_out_with_a_warning(
    sample_loaded, tmp_path, caplog, value
):
    groups = sample_groups(6)
    vector = groups[1][1]["type_1/layer_0/embedding"].copy()
    vector[7] = value
    groups[1][1]["type_1/layer_0/embedding"] = vector
    queries = write_queries(tmp_path / "queries.h5", groups)
    experiment = tmp_path / "experiment"
    with caplog.at_level(logging.WARNING):
        result = run_lookup(parse_config(config_dict(experiment, queries, **near_only())), sample_loaded)
    bad = groups[1][0]
    accession = bad[len("accession_") :]
    everyone = {name[len("accession_") :] for name, _ in groups}
    # left out of layer 0 only; still annotated from layer 1
    assert _shard_accessions(experiment, "NEAR", 0) == everyone - {accession}
    assert _shard_accessions(experiment, "NEAR", 1) == everyone
    assert (
        f"{queries}: {bad} left out of NEAR|layer_0: type_1/layer_0 has NaN or infinite values" in caplog.text
    )
    assert _skipped(experiment).rows() == [(bad, "NEAR|layer_0", "type_1/layer_0 has NaN or infinite values")]
    report = {p.partition.key: p for p in result.partitions}
    assert report["NEAR|layer_0"].skipped == 1 and report["NEAR|layer_0"].n_queries == 5
    summary = pl.read_csv(experiment / "summary.csv")
    assert accession in summary["accession"].to_list()


def test_one_query_vector_of_the_wrong_length__that_query_left_out_with_a_warning(
    sample_loaded, tmp_path, caplog
):
    groups = sample_groups(5)
    groups[3][1]["type_1/layer_0/embedding"] = groups[3][1]["type_1/layer_0/embedding"][:200]
    queries = write_queries(tmp_path / "queries.h5", groups)
    experiment = tmp_path / "experiment"
    run_lookup(parse_config(config_dict(experiment, queries, **near_only([0]))), sample_loaded)
    bad = groups[3][0]
    reason = "type_1/layer_0 has 200 values, expected 256"
    assert f"{bad} left out of NEAR|layer_0: {reason}" in caplog.text
    assert bad[len("accession_") :] not in _shard_accessions(experiment, "NEAR", 0)
    assert len(_shard_accessions(experiment, "NEAR", 0)) == 4
    assert _skipped(experiment).rows() == [(bad, "NEAR|layer_0", reason)]


def test_every_query_vector_of_another_model__partition_fails_naming_model_and_lengths(
    sample_loaded, tmp_path, capsys
):
    groups = sample_groups(4)
    for _, content in groups:  # AntiBERTy's 512-d vectors filed under NEAR's type id
        content["type_1/layer_0/embedding"] = content["type_2/layer_0/embedding"]
    queries = write_queries(tmp_path / "queries.h5", groups)
    experiment = tmp_path / "experiment"
    with pytest.raises(LookupPlanError) as error:
        run_lookup(parse_config(config_dict(experiment, queries, **near_only([0]))), sample_loaded)
    message = str(error.value)
    assert str(queries) in message and "NEAR layer_0" in message
    assert "512 values, expected 256" in message and "type_1 the right model" in message
    assert not (experiment / "summary.csv").exists()


def test_accessions_equal_after_pipe_to_underscore__both_kept_warned_with_distinct_files(
    sample_loaded, tmp_path, caplog
):
    groups = sample_groups(3)
    groups[0] = ("accession_sp|P1|X", groups[0][1])
    groups[1] = ("accession_sp_P1_X", groups[1][1])
    queries = write_queries(tmp_path / "queries.h5", groups)
    experiment = tmp_path / "experiment"
    run_lookup(parse_config(config_dict(experiment, queries, **near_only([0]))), sample_loaded)
    assert "are the same accession once '|' is written as '_'" in caplog.text
    assert "accession_sp_P1_X" in caplog.text and "accession_sp|P1|X" in caplog.text
    names = pl.read_csv(experiment / "output_names.csv").filter(pl.col("kind") == "accession")
    files = dict(names.select("name", "file_name").iter_rows())
    assert files["sp_P1_X"] != files["sp|P1|X"]
    shards = experiment / "raw_results" / "NEAR" / "layer_0"
    for accession in ("sp_P1_X", "sp|P1|X"):
        assert set(pl.read_csv(shards / files[accession])["accession"]) == {accession}
    summary = pl.read_csv(experiment / "summary.csv")
    assert {"sp_P1_X", "sp|P1|X"} <= set(summary["accession"])


def test_query_model_id_absent_from_the_database__warned_and_known_models_still_run(
    sample_loaded, tmp_path, caplog
):
    groups = sample_groups(4)
    for _, content in groups:
        content["type_7/layer_0/embedding"] = content["type_2/layer_0/embedding"]
        for key in [k for k in content if k.startswith("type_2/")]:
            del content[key]
    queries = write_queries(tmp_path / "queries.h5", groups)
    experiment = tmp_path / "experiment"
    result = run_lookup(parse_config(config_dict(experiment, queries)), sample_loaded)
    assert f"{queries}: type_7 embeddings match no model of the reference database" in caplog.text
    assert f"model AntiBERTy: {queries} has no type_2 embeddings at all; model skipped" in caplog.text
    assert sorted(p.partition.key for p in result.partitions) == ["NEAR|layer_0", "NEAR|layer_1"]
    assert len(_shard_accessions(experiment, "NEAR", 1)) == 4


def test_layer_absent_for_some_queries__others_annotated_and_the_gaps_listed(sample_loaded, tmp_path, caplog):
    groups = sample_groups(6)
    for index in (0, 4):
        del groups[index][1]["type_1/layer_1/embedding"]
    queries = write_queries(tmp_path / "queries.h5", groups)
    experiment = tmp_path / "experiment"
    run_lookup(parse_config(config_dict(experiment, queries, **near_only())), sample_loaded)
    gaps = [groups[0][0], groups[4][0]]
    everyone = {name[len("accession_") :] for name, _ in groups}
    assert _shard_accessions(experiment, "NEAR", 0) == everyone
    assert _shard_accessions(experiment, "NEAR", 1) == everyone - {g[len("accession_") :] for g in gaps}
    assert _skipped(experiment).rows() == [(g, "NEAR|layer_1", "no type_1/layer_1 embedding") for g in gaps]
    for group in gaps:
        assert f"{group} left out of NEAR|layer_1: no type_1/layer_1 embedding" in caplog.text
    assert hidden(experiment) == []


def test_query_file_half_copied_at_a_sensor_tick__tick_skipped_naming_it_then_change_seen(
    sample_loaded, tmp_path
):
    from fantasia_assets.defs.automation import guarded_tick
    from fantasia_assets.defs.resources import LookupSettings, ReferenceDatabase

    queries = tmp_path / "queries.h5"
    queries.write_bytes(SAMPLE_QUERIES.read_bytes())
    config = write_config(tmp_path / "config.yaml", config_dict(tmp_path / "experiment", queries))
    settings, database = LookupSettings(config_path=str(config)), ReferenceDatabase()
    first = guarded_tick(settings, database, None, set())
    keys = {"NEAR|layer_0", "NEAR|layer_1", "AntiBERTy|layer_0", "AntiBERTy|layer_3"}
    assert first.run_requests == []
    # a new proteome being copied over the old one: only its first part is there yet
    new = tmp_path / "new.h5"
    write_queries(new, sample_groups(20))
    queries.write_bytes(new.read_bytes()[: new.stat().st_size // 3])
    skipped = guarded_tick(settings, database, first.cursor, keys)
    assert isinstance(skipped, dg.SkipReason)
    assert str(queries) in skipped.skip_message and "not a readable HDF5 file" in skipped.skip_message
    queries.write_bytes(new.read_bytes())  # the copy has finished
    after = guarded_tick(settings, database, first.cursor, keys)
    assert sorted(r.partition_key for r in after.run_requests if r.partition_key) == sorted(keys)


def test_nan_query_in_a_dagster_partition__check_warns_with_the_group_and_run_succeeds(
    sample_loaded, tmp_path
):
    from fantasia_assets.definitions import defs
    from fantasia_assets.defs import checks, lookup
    from fantasia_assets.defs.partitions import MODEL_LAYER
    from fantasia_assets.defs.resources import LookupSettings

    groups = sample_groups(5)
    groups[2][1]["type_1/layer_0/embedding"] = np.full(256, np.nan, dtype=np.float32)
    queries = write_queries(tmp_path / "queries.h5", groups)
    config = write_config(
        tmp_path / "config.yaml", config_dict(tmp_path / "experiment", queries, **near_only([0]))
    )
    resources = {**defs.resources, "settings": LookupSettings(config_path=str(config))}
    with dg.DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions(MODEL_LAYER.name, ["NEAR|layer_0"])
        result = dg.materialize(
            [lookup.reference_embeddings, lookup.neighbour_hits, checks.every_query_answered],
            resources=resources,
            instance=instance,
            partition_key="NEAR|layer_0",
        )
    assert result.success
    [check] = [e for e in result.get_asset_check_evaluations() if e.check_name == "every_query_answered"]
    assert not check.passed and check.severity == dg.AssetCheckSeverity.WARN
    metadata = {k: v.value for k, v in check.metadata.items()}
    assert metadata["left_out"] == 1 and metadata["unaccounted"] == 0
    assert metadata["left_out_reasons"] == [f"{groups[2][0]}: type_1/layer_0 has NaN or infinite values"]


def test_damaged_heap_the_hdf5_library_loops_on__its_group_skipped_naming_the_byte_others_annotated(
    sample_loaded, tmp_path
):
    """A global heap collection damaged so that the HDF5 library would walk it without end (h5py's
    read never returns, in any process): the lookup ends, the group whose sequence lives there is
    skipped with the collection's byte, and the others are annotated. The lookup runs as the CLI
    in a child with a time limit, so that a scan that hangs fails the test instead of the suite."""
    import os
    import subprocess
    import sys

    from fantasia_assets_tests.conftest import PROJECT

    groups = sample_groups(6)
    long_sequence = groups[2][1]["sequence"] * (5000 // len(groups[2][1]["sequence"]) + 1)
    groups[2][1]["sequence"] = long_sequence  # too big for the first collection: one of its own
    queries = write_queries(tmp_path / "queries.h5", groups)
    data = bytearray(queries.read_bytes())
    collection = data.index(b"GCOL\x01")
    while int.from_bytes(data[collection + 24 : collection + 32], "little") != len(long_sequence):
        collection = data.index(b"GCOL\x01", collection + 1)  # the long sequence's collection
    first = collection + 16
    data[first : first + 2] = bytes(2)  # its object made free space of size 0
    data[first + 8 : first + 16] = bytes(8)
    queries.write_bytes(bytes(data))
    experiment = tmp_path / "experiment"
    config = write_config(tmp_path / "config.yaml", config_dict(experiment, queries, **near_only([0])))
    done = subprocess.run(
        [sys.executable, "-m", "fantasia_assets.cli", "lookup", "--config", str(config)],
        env={**os.environ, "PYTHONPATH": str(PROJECT)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    bad = groups[2][0]
    reason = (
        f"unreadable 'sequence' dataset (the global heap collection at byte {collection} is damaged: "
        f"its object at byte {first} is free space of size 0, which the HDF5 library reads again "
        "without end)"
    )
    assert f"{queries}: skipped {bad}: {reason}" in done.stderr
    good = {name[len("accession_") :] for name, _ in groups} - {bad[len("accession_") :]}
    assert _shard_accessions(experiment, "NEAR", 0) == good
    assert _skipped(experiment).rows() == [(bad, "", reason)]
