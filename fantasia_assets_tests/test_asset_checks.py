"""The Dagster shell on the sample: checks fail on damaged files, config keys reach the assets."""

from __future__ import annotations

import shutil

import dagster as dg
import numpy as np
import polars as pl
import pytest

from fantasia_assets.defs import checks, lookup, outputs
from fantasia_assets.defs.partitions import MODEL_LAYER
from fantasia_assets.defs.resources import (
    ComputeDevice,
    LineageStore,
    LookupSettings,
    MMseqs,
    ReferenceDatabase,
)
from fantasia_assets_tests.hardening.helpers import config_dict, near_only, write_config

KEY = "NEAR|layer_0"
PARTITIONED = [
    lookup.reference_embeddings,
    lookup.neighbour_hits,
    lookup.raw_result_shards,
    lookup.topgo_exports,
]


def _resources(config, **overrides) -> dict:
    return {
        "settings": LookupSettings(config_path=str(config)),
        "database": ReferenceDatabase(),
        "device": ComputeDevice(),
        "mmseqs": MMseqs(),
        "lineage": LineageStore(),
        **overrides,
    }


def _config(tmp_path, **overrides):
    raw = config_dict(tmp_path / "experiment", **near_only([0]), **{"lookup.use_gpu": False, **overrides})
    return write_config(tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.yaml", raw)


def _materialize(instance, config, assets, selection=None, partition_key=KEY, **resources):
    return dg.materialize(
        assets,
        selection=selection,
        resources=_resources(config, **resources),
        instance=instance,
        partition_key=partition_key,
        raise_on_error=False,
    )


def _evaluation(result, name: str) -> dg.AssetCheckEvaluation:
    [evaluation] = [e for e in result.get_asset_check_evaluations() if e.check_name == name]
    return evaluation


@pytest.fixture()
def instance():
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(MODEL_LAYER.name, [KEY])
        yield instance


def test_each_asset_check_reads_the_written_file__and_fails_when_that_file_is_damaged(
    sample_loaded, tmp_path, instance
):
    # FANTASIA's conventions here (several TopGO lines per term); the demo's test covers ours
    config = _config(tmp_path, **{"postprocess.fantasia_compat": True})
    checked = [*PARTITIONED, *checks.ALL[:3]]
    assert _materialize(instance, config, [lookup.go_annotation_cache, *checked]).success
    summary = [lookup.raw_result_shards, outputs.lookup_summary, checks.covers_every_partition]
    result = _materialize(instance, config, summary, selection=[outputs.lookup_summary], partition_key=None)
    assert result.success
    experiment = tmp_path / "experiment"

    def run_check(check, partition_key=KEY):
        """The check alone, in a run of its own, on what is on disk now."""
        job = dg.define_asset_job("check_only", selection=dg.AssetSelection.checks(check))
        assets = PARTITIONED if partition_key else [outputs.lookup_summary]
        definitions = dg.Definitions(
            assets=assets, asset_checks=[check], jobs=[job], resources=_resources(config)
        )
        # a selection of checks alone has no partitions of its own: the partition goes in as a run tag
        run = definitions.resolve_job_def("check_only").execute_in_process(
            instance=instance, tags={"dagster/partition": partition_key} if partition_key else None
        )
        assert run.success
        return _evaluation(run, check.check_key.name)

    for check in checks.ALL:  # all pass on what was written
        assert run_check(check, None if check is checks.covers_every_partition else KEY).passed, check

    # the cached matrix replaced by one of another width
    matrix_file = (
        instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=lookup.reference_embeddings.key, asset_partitions=[KEY]), limit=1
        )
        .records[0]
        .asset_materialization.metadata["matrix_file"]
        .value
    )
    saved = tmp_path / "matrix.npy"
    shutil.copy(matrix_file, saved)
    vectors = np.load(saved)
    np.save(matrix_file, np.zeros((len(vectors), vectors.shape[1] + 1), vectors.dtype))
    evaluation = run_check(checks.dimensions_agree)
    assert not evaluation.passed and evaluation.metadata["reference_dimensions"].value == vectors.shape[1] + 1
    shutil.copy(saved, matrix_file)

    # the written hits lose one query
    hits_file = experiment / "parquet" / "NEAR" / "layer_0" / "neighbour_hits.parquet"
    hits = pl.read_parquet(hits_file)
    dropped = hits["accession"][0]
    hits.filter(pl.col("accession") != dropped).write_parquet(hits_file)
    evaluation = run_check(checks.every_query_answered)
    assert not evaluation.passed and evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert evaluation.metadata["unaccounted_examples"].value == [dropped]

    # one TopGO line with another reliability index
    topgo = experiment / "topgo" / "NEAR" / "layer_0" / "P.topgo"
    lines = topgo.read_text().splitlines()
    accession, go_id, _ = lines[0].split("\t")
    topgo.write_text("\n".join([f"{accession}\t{go_id}\t0.0001", *lines[1:]]) + "\n")
    evaluation = run_check(checks.topgo_rows_in_raw_rows)
    assert not evaluation.passed and evaluation.metadata["wrong_ri"].value == 1
    topgo.write_text("\n".join(lines[1:]) + "\n")  # and one line missing
    evaluation = run_check(checks.topgo_rows_in_raw_rows)
    assert not evaluation.passed and evaluation.metadata["missing"].value == 1

    # summary.csv with the columns of a partition the configuration no longer has
    summary_file = experiment / "summary.csv"
    summary = pl.read_csv(summary_file)
    summary.with_columns(pl.col("final_score_NEAR_L0").alias("final_score_NEAR_L9")).write_csv(summary_file)
    evaluation = run_check(checks.covers_every_partition, None)
    assert not evaluation.passed and evaluation.metadata["not_in_the_configuration"].value == ["NEAR_L9"]
    # summary.csv without the partition's final score
    summary.drop("final_score_NEAR_L0").write_csv(summary_file)
    evaluation = run_check(checks.covers_every_partition, None)
    assert not evaluation.passed and evaluation.metadata["missing"].value == [KEY]


def test_lookup_topgo_false__partition_and_ensemble_assets_write_no_topgo_file(
    sample_loaded, tmp_path, instance
):
    config = _config(tmp_path, **{"lookup.topgo": False})
    assert _materialize(instance, config, [lookup.go_annotation_cache, *PARTITIONED, checks.ALL[2]]).success
    ensemble = _materialize(
        instance, config, [lookup.raw_result_shards, outputs.topgo_ensemble], [outputs.topgo_ensemble], None
    )
    assert ensemble.success
    assert (tmp_path / "experiment" / "raw_results").is_dir()
    assert not (tmp_path / "experiment" / "topgo").exists()


def test_lookup_cache_max__the_search_step_takes_the_matrix_its_run_loaded_from_memory_or_disk(
    sample_loaded, tmp_path, instance
):
    for cache_max, source in ((4, "memory"), (0, "disk")):
        config = _config(tmp_path, **{"lookup.lookup_cache_max": cache_max})
        result = _materialize(instance, config, [lookup.reference_embeddings, lookup.neighbour_hits])
        assert result.success
        events = {m.asset_key: m.materialization for m in result.get_asset_materialization_events()}
        fingerprint = events[lookup.reference_embeddings.key].metadata["matrix_fingerprint"].value
        hits = events[lookup.neighbour_hits.key]
        assert hits.metadata["consumed_matrix"].value == f"{fingerprint} (from {source})"
        assert hits.tags["dagster/data_version"]  # the digest of the written files


def test_mmseqs_resource__its_path_is_the_binary_clustering_runs(sample_loaded, tmp_path, instance):
    config = _config(tmp_path, **{"lookup.redundancy": {"identity": 0.9, "coverage": 0.8, "threads": 1}})
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "fake-mmseqs"
    fake.write_text(f'#!/bin/sh\necho "$1" >> {calls}\nexit 3\n')
    fake.chmod(0o755)
    result = _materialize(
        instance, config, [lookup.mmseqs_clusters], partition_key=None, mmseqs=MMseqs(path=str(fake))
    )
    assert not result.success
    assert calls.read_text().split() == ["createdb"]  # MMseqs2's first step, run with the resource's binary
    [failure] = [e for e in result.all_events if e.is_step_failure]
    assert "exit code 3" in failure.step_failure_data.error.cause.message


def test_layer_dropped_from_the_configuration__the_summary_step_removes_its_folders_and_names_them(
    sample_loaded, tmp_path
):
    both = write_config(
        tmp_path / "both.yaml",
        config_dict(tmp_path / "experiment", **near_only([0, 1]), **{"lookup.use_gpu": False}),
    )
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(MODEL_LAYER.name, [KEY, "NEAR|layer_1"])
        for key in (KEY, "NEAR|layer_1"):
            assert _materialize(
                instance, both, [lookup.go_annotation_cache, *PARTITIONED], partition_key=key
            ).success
        experiment = tmp_path / "experiment"
        dropped = [experiment / root / "NEAR" / "layer_1" for root in ("raw_results", "topgo", "parquet")]
        assert all(folder.is_dir() for folder in dropped)
        only_0 = _config(tmp_path)  # NEAR layer 0 alone
        result = _materialize(
            instance,
            only_0,
            [lookup.raw_result_shards, outputs.lookup_summary],
            [outputs.lookup_summary],
            None,
        )
        assert result.success
    assert not any(folder.exists() for folder in dropped)
    assert (experiment / "raw_results" / "NEAR" / "layer_0").is_dir()
    metadata = result.asset_materializations_for_node("lookup_summary")[0].metadata
    assert set(metadata["removed_stale"].value) >= {
        "raw_results/NEAR/layer_1",
        "topgo/NEAR/layer_1",
        "parquet/NEAR/layer_1",
    }
    assert not any("_L1" in column for column in pl.read_csv(experiment / "summary.csv").columns)
    assert metadata["not_computed"].value == []


def test_layer_enabled_but_never_computed__the_summary_names_it_as_not_covered(
    sample_loaded, tmp_path, instance
):
    assert _materialize(instance, _config(tmp_path), [lookup.go_annotation_cache, *PARTITIONED]).success
    both = write_config(
        tmp_path / "both.yaml",
        config_dict(tmp_path / "experiment", **near_only([0, 1]), **{"lookup.use_gpu": False}),
    )
    result = _materialize(
        instance, both, [lookup.raw_result_shards, outputs.lookup_summary], [outputs.lookup_summary], None
    )
    assert result.success
    metadata = result.asset_materializations_for_node("lookup_summary")[0].metadata
    assert metadata["not_computed"].value == ["NEAR|layer_1"]
    logged = [record.user_message for record in instance.all_logs(result.run_id)]
    assert "not in the summary, not computed yet: NEAR|layer_1" in logged


def test_configuration_with_two_errors_read_by_a_step__it_fails_with_one_message_naming_both(
    sample_loaded, tmp_path, instance
):
    raw = config_dict(tmp_path / "experiment", **near_only([0]), **{"lookup.use_gpu": False})
    raw["limit_per_entry"], raw["lookup"]["limit_per_entry"] = "five", "six"
    bad = write_config(tmp_path / "bad.yaml", raw)
    result = _materialize(instance, bad, [lookup.go_annotation_cache], partition_key=None)
    assert not result.success
    [failure] = [event for event in result.all_events if event.is_step_failure]
    described = failure.step_failure_data.user_failure_data.description  # a dg.Failure, not a crash
    assert described.startswith(f"{bad}: ")
    assert "limit_per_entry: expected an integer" in described
    assert "lookup.limit_per_entry: expected an integer" in described
