"""The Dagster search asset (what the sensor's re-runs materialise) is incremental too, and its
metadata says which kind of update ran; its neighbours equal a full search's."""

from __future__ import annotations

import dataclasses

import dagster as dg
import polars as pl
import yaml

from fantasia_assets.defs.lookup import neighbour_hits
from fantasia_assets.defs.partitions import MODEL_LAYER
from fantasia_assets.defs.resources import LookupSettings, default_resources
from fantasia_assets.runner import run_lookup
from fantasia_assets_tests.incremental.test_reruns import REFS, _config, _load, _names, _subset_h5

KEY = "NEAR|layer_0"


def _materialize(instance) -> dict:
    result = dg.materialize(
        [neighbour_hits], partition_key=KEY, resources=default_resources(), instance=instance
    )
    assert result.success
    [event] = result.get_asset_materialization_events()
    return {name: value.value for name, value in event.materialization.metadata.items()}


def test_search_asset_merges_added_references(engine, tmp_path, monkeypatch):
    names = _names(REFS)
    _load(engine, _subset_h5(REFS, tmp_path / "first.h5", names[:200]))
    raw = _config(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("FANTASIA_CONFIG", str(path))
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(MODEL_LAYER.name, [KEY])
        first = _materialize(instance)
        assert first["update_kind"] == "full" and first["queries_searched"] == 50
        _load(engine, _subset_h5(REFS, tmp_path / "later.h5", names[200:]), gaf=[])
        second = _materialize(instance)
    assert second["update_kind"] == "references added"
    assert second["queries_searched"] == 0 and second["queries_merged"] == 50
    hits = pl.read_parquet(
        tmp_path / "experiment" / "parquet" / "NEAR" / "layer_0" / "neighbour_hits.parquet"
    )
    config = LookupSettings(config_path=str(path)).load()
    fresh = dataclasses.replace(config, experiment_path=tmp_path / "fresh")
    result = run_lookup(fresh, engine)
    assert result.updates[KEY].kind == "full"
    assert hits.equals(
        pl.read_parquet(tmp_path / "fresh" / "parquet" / "NEAR" / "layer_0" / "neighbour_hits.parquet")
    )
