"""The asset graph on the real embedded database, materialised in-process."""

from __future__ import annotations

import json
from pathlib import Path

import dagster as dg
import duckdb
import pytest
import yaml

from fantasia_assets.db.loader import load_references
from fantasia_assets.defs.automation import evaluate_changes, stale_partitions
from fantasia_assets.defs.partitions import LookupState
from fantasia_assets.defs.resources import LookupSettings, ReferenceDatabase
from fantasia_assets_tests.conftest import PROJECT, SAMPLE


@pytest.fixture()
def settings(tmp_path, monkeypatch):
    raw = yaml.safe_load((PROJECT / "data" / "config.yaml").read_text())
    raw["experiment_path"] = str(tmp_path / "experiment")
    raw["embeddings_path"] = str(SAMPLE / "queries.h5")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("FANTASIA_CONFIG", str(path))
    return LookupSettings(config_path=str(path))


def test_definitions_load():
    from fantasia_assets.definitions import defs

    keys = {a.key.to_user_string() for a in defs.resolve_all_asset_specs()}
    assert {
        "reference_set", "query_embeddings", "go_ontology", "go_annotation_cache", "reference_embeddings",
        "mmseqs_clusters", "neighbour_hits", "raw_result_shards", "lookup_summary", "topgo_exports",
        "topgo_ensemble",
    } <= keys  # fmt: skip
    # every asset that computes something says which version of its code did (the observable
    # inputs run no science of ours)
    unversioned = {
        spec.key.to_user_string() for spec in defs.resolve_all_asset_specs() if spec.code_version is None
    }
    assert unversioned == {"reference_set", "query_sequences", "go_ontology"}


def test_materialize_everything(sample_loaded, settings, tmp_path):
    import importlib

    import fantasia_assets.definitions as definitions
    from fantasia_assets.defs import demo

    importlib.reload(definitions)  # resources read FANTASIA_CONFIG / FANTASIA_DATABASE_URL at import
    with dg.instance_for_test() as instance:
        keys = demo.materialize_everything(instance, log=lambda _: None)
        assert sorted(keys) == ["AntiBERTy|layer_0", "AntiBERTy|layer_3", "NEAR|layer_0", "NEAR|layer_1"]
        for key in keys:
            assert instance.get_materialized_partitions(dg.AssetKey("raw_result_shards")) >= {key}
        for asset, name in [
            ("reference_embeddings", "dimensions_agree"),
            ("neighbour_hits", "every_query_answered"),
            ("topgo_exports", "topgo_rows_in_raw_rows"),
            ("lookup_summary", "covers_every_partition"),
        ]:  # the jobs ran every check, and each passed on the files written
            history = instance.event_log_storage.get_asset_check_execution_history(
                dg.AssetCheckKey(dg.AssetKey(asset), name), limit=10
            )
            assert history and all(c.status.value == "SUCCEEDED" for c in history), name
            evaluations = [c.event.asset_check_evaluation for c in history]
            assert all(e.passed for e in evaluations), name
        for asset in ("mmseqs_clusters", "neighbour_hits"):
            [record] = instance.fetch_materializations(dg.AssetKey(asset), limit=1).records
            assert record.asset_materialization.tags.get("dagster/data_version"), asset
        assert {r.job_name for r in instance.get_runs()} == {
            "query_embeddings_job", "lookup_shared_inputs_job", "lookup_partition_job", "lookup_outputs_job",
        }  # fmt: skip
        experiment = Path(settings.load().experiment_path)
        assert (experiment / "summary.csv").exists()
        assert (experiment / "predictions.tsv").exists()
        assert (experiment / "topgo" / "ensemble" / "P.topgo").exists()
        with duckdb.connect(str(experiment / "lineage.duckdb"), read_only=True) as conn:
            rows = conn.execute(
                "SELECT asset, partition, row_counts FROM lineage ORDER BY materialized_at"
            ).fetchall()
        assets = [r[0] for r in rows]
        assert assets.count("neighbour_hits") == 4 and assets.count("lookup_summary") == 1
        assert all(json.loads(r[2]) for r in rows)
        # everything materialised from the current versions: the backstop finds nothing stale
        state = LookupState.open(settings, ReferenceDatabase())
        assert stale_partitions(instance, state) == []
        # settings of speed or of the run-wide outputs alone leave every partition current
        raw = yaml.safe_load(Path(settings.config_path).read_text())
        raw["lookup"]["screening"] = "fp32"
        raw["postprocess"].setdefault("summary", {})["weighted_prefix"] = "weighted_"
        Path(settings.config_path).write_text(yaml.safe_dump(raw))
        assert stale_partitions(instance, LookupState.open(settings, ReferenceDatabase())) == []
        # a setting of the results changed: every partition is stale until it runs again
        raw["lookup"]["limit_per_entry"] = 3
        Path(settings.config_path).write_text(yaml.safe_dump(raw))
        state = LookupState.open(settings, ReferenceDatabase())
        assert stale_partitions(instance, state) == sorted(keys)
        # predictions without the GO graph: not written, said in the metadata; no failed run
        raw["scoring"]["ontology"] = None
        Path(settings.config_path).write_text(yaml.safe_dump(raw))
        result = dg.materialize(
            [definitions.science.predictions],
            resources={"settings": settings, "database": ReferenceDatabase()},
            instance=instance,
        )
        assert result.success
        [materialisation] = result.asset_materializations_for_node("predictions")
        assert materialisation.metadata["written"].value is False
        assert not (experiment / "predictions.tsv").exists()  # the earlier one no longer matched


def test_sensor_requests_only_changed_model(sample_loaded, settings, tmp_path):
    import h5py
    import numpy as np

    state = LookupState.open(settings, ReferenceDatabase())
    keys = set(state.partitions)
    first = evaluate_changes(state, None, set())
    assert not first.run_requests  # the first tick records
    cursor = first.cursor
    quiet = evaluate_changes(LookupState.open(settings, ReferenceDatabase()), cursor, keys)
    assert not quiet.run_requests and not quiet.asset_events
    # a new NEAR embedding file with one changed vector
    changed = tmp_path / "near.h5"
    import shutil

    shutil.copy(SAMPLE / "references_near.h5", changed)
    with h5py.File(changed, "r+") as handle:
        name = sorted(handle)[0]
        vector = handle[f"{name}/type_1/layer_0/embedding"]
        vector[...] = np.asarray(vector) * 0.5 + 0.1
    load_references(sample_loaded, embeddings=changed, model="NEAR")
    after = evaluate_changes(LookupState.open(settings, ReferenceDatabase()), cursor, keys)
    partition_runs = sorted(r.partition_key for r in after.run_requests if r.partition_key)
    assert partition_runs == ["NEAR|layer_0"]
    assert [e.partition for e in after.asset_events] == ["NEAR|layer_0"]
    # a newer GAF touches the annotations every partition transfers
    again = evaluate_changes(LookupState.open(settings, ReferenceDatabase()), after.cursor, keys)
    assert not again.run_requests
    gaf = tmp_path / "newer.gaf.gz"
    import gzip

    with gzip.open(SAMPLE / "references.gaf.gz", "rt") as handle:
        lines = handle.read().splitlines(keepends=True)
    kept = [line for line in lines if line.startswith("!") or line.split("\t")[6] != "IDA"]
    with gzip.open(gaf, "wt") as handle:
        handle.writelines(kept)
    load_references(
        sample_loaded, fasta=SAMPLE / "references.fasta.gz", gaf=[gaf], obo=SAMPLE / "go-basic.obo.gz"
    )
    final = evaluate_changes(LookupState.open(settings, ReferenceDatabase()), again.cursor, keys)
    assert sorted(r.partition_key for r in final.run_requests if r.partition_key) == sorted(keys)


def test_sensor_requests_every_partition_when_queries_change(sample_loaded, tmp_path):
    import shutil

    import h5py

    queries = tmp_path / "queries.h5"
    shutil.copy(SAMPLE / "queries.h5", queries)
    raw = yaml.safe_load((PROJECT / "data" / "config.yaml").read_text())
    raw["experiment_path"] = str(tmp_path / "experiment")
    raw["embeddings_path"] = str(queries)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(raw))
    settings = LookupSettings(config_path=str(config))
    state = LookupState.open(settings, ReferenceDatabase())
    keys = set(state.partitions)
    first = evaluate_changes(state, None, set())
    assert sorted(r.partition_key for r in first.run_requests) == []
    with h5py.File(queries, "r+") as handle:
        name = sorted(handle)[0]
        handle[f"{name}/type_1/layer_0/embedding"][0] += 1.0
    after = evaluate_changes(LookupState.open(settings, ReferenceDatabase()), first.cursor, keys)
    assert sorted(r.partition_key for r in after.run_requests if r.partition_key) == sorted(keys)
    assert any(e.asset_key == dg.AssetKey("query_embeddings") for e in after.asset_events)


def test_evaluation_asset_evaluates_every_output_of_a_finished_lookup(sample_loaded, settings):
    from fantasia_assets.defs.science import TruthAnnotations, evaluation
    from fantasia_assets.runner import run_lookup

    config = settings.load()
    run_lookup(config, sample_loaded)
    truth = TruthAnnotations(gaf_paths=str(SAMPLE / "queries_truth.gaf.gz"))
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [evaluation],
            resources={"settings": settings, "database": ReferenceDatabase(), "truth": truth},
            instance=instance,
        )
        assert result.success
    metrics = (config.experiment_path / "evaluation" / "metrics.tsv").read_text().splitlines()
    rows = [line.split("\t")[:2] for line in metrics[1:]]
    partitions = ["AntiBERTy_L0", "AntiBERTy_L3", "NEAR_L0", "NEAR_L1"]
    # every output the issue names: predictions, each (model, layer)'s TopGO, the ensemble, each final_score
    expected = {"predictions", "topgo_ensemble"}
    expected |= {f"topgo_{p.replace('_L', '_layer_')}" for p in partitions}
    expected |= {f"summary_final_score_{p}" for p in partitions}
    assert {output for output, _ in rows} == expected
    assert sorted(rows) == sorted([output, aspect] for output in expected for aspect in "CFP")


def test_partitions_command_registers_the_configurations_keys_and_removes_dropped_ones(
    sample_loaded, settings, tmp_path, monkeypatch, capsys
):
    import importlib

    import fantasia_assets.definitions as definitions
    from fantasia_assets import cli
    from fantasia_assets.defs.partitions import MODEL_LAYER

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    (tmp_path / "dagster").mkdir()
    importlib.reload(definitions)  # resources read FANTASIA_CONFIG / FANTASIA_DATABASE_URL at import
    assert cli.main(["partitions"]) == 0
    out = capsys.readouterr().out
    assert "  NEAR|layer_0  (added)" in out and "  AntiBERTy|layer_3  (added)" in out
    # the configuration drops AntiBERTy: its keys go, the others stay registered
    raw = yaml.safe_load(Path(settings.config_path).read_text())
    raw["embedding"]["models"]["AntiBERTy"]["enabled"] = False
    Path(settings.config_path).write_text(yaml.safe_dump(raw))
    assert cli.main(["partitions"]) == 0
    out = capsys.readouterr().out
    assert "  NEAR|layer_0\n" in out and "(added)" not in out
    assert "  AntiBERTy|layer_0  (removed: not in the configuration" in out
    with dg.DagsterInstance.get() as instance:
        assert sorted(instance.get_dynamic_partitions(MODEL_LAYER.name)) == ["NEAR|layer_0", "NEAR|layer_1"]


def test_partitions_command_without_dagster_home__one_line_error(settings, monkeypatch, capsys):
    from fantasia_assets import cli

    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    assert cli.main(["partitions"]) == 2
    assert capsys.readouterr().err.startswith("error: DAGSTER_HOME is not set")
