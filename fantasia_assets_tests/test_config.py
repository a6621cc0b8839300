"""Configuration: the SPEC §2.3 keys, validated, every error naming its key."""

from __future__ import annotations

import copy

import pytest
import yaml

from fantasia_assets.config import ConfigError, load_config, parse_config
from fantasia_assets_tests.conftest import PROJECT

BASE = yaml.safe_load((PROJECT / "data" / "config.yaml").read_text())


def _with(path: str, value):
    raw = copy.deepcopy(BASE)
    node = raw
    *parents, leaf = path.split(".")
    for key in parents:
        node = node[key]
    node[leaf] = value
    return raw


def test_sample_config_parses_with_every_key():
    config = load_config(PROJECT / "data" / "config.yaml")
    assert config.limit_per_entry == 5 and config.batch_size == 516 and config.precision == 4
    assert [m.name for m in config.enabled_models()] == ["NEAR", "AntiBERTy"]
    assert config.model("NEAR").layer_index == (0, 1)
    assert config.summary.weighted_prefix == "w_"
    assert config.redundancy.identity == 0.0


@pytest.mark.parametrize("value", [None, False, "off", "None", "null", 0, -1])
def test_threshold_off_values(value):
    assert (
        parse_config(_with("embedding.models.NEAR.distance_threshold", value))
        .model("NEAR")
        .distance_threshold
        is None
    )


def test_threshold_number():
    assert (
        parse_config(_with("embedding.models.NEAR.distance_threshold", 0.25)).model("NEAR").distance_threshold
        == 0.25
    )


@pytest.mark.parametrize(
    "path, value, key",
    [
        ("lookup.bogus", 1, "lookup.bogus"),
        ("nonsense", 1, "nonsense"),
        ("postprocess.summary.colour", "red", "postprocess.summary.colour"),
        ("embedding.models.NEAR.layers", [0], "embedding.models.NEAR.layers"),
        ("limit_per_entry", -3, "limit_per_entry"),
        ("lookup.limit_per_entry", 0, "lookup.limit_per_entry"),
        ("lookup.limit_per_entry", "5", "lookup.limit_per_entry"),
        ("lookup.use_gpu", "yes", "lookup.use_gpu"),
        ("lookup.distance_metric", "manhattan", "lookup.distance_metric"),
        ("lookup.redundancy.identity", 1.5, "lookup.redundancy.identity"),
        ("lookup.redundancy.threads", 0, "lookup.redundancy.threads"),
        (
            "embedding.models.NEAR.distance_threshold",
            "0.3; DROP TABLE protein",
            "embedding.models.NEAR.distance_threshold",
        ),
        ("embedding.models.NEAR.layer_index", ["0"], "embedding.models.NEAR.layer_index[0]"),
        ("embedding.models.NEAR.layer_index", [], "embedding.models.NEAR.layer_index"),
        ("lookup.taxonomy.exclude", ["1) OR 1=1 --"], "lookup.taxonomy.exclude"),
        ("lookup.taxonomy.include_only", ["abc"], "lookup.taxonomy.include_only"),
        ("lookup.taxonomy.get_descendants", True, "lookup.taxonomy.get_descendants"),
        ("postprocess.summary.weights", {"count": -1}, "postprocess.summary.weights.count"),
        ("precision", 2.5, "precision"),
    ],
)
def test_bad_values_name_their_key(path, value, key):
    with pytest.raises(ConfigError) as error:
        parse_config(_with(path, value))
    assert key in str(error.value)


def test_lookup_level_wins_over_top_level():
    raw = _with("batch_size", 10)
    raw["lookup"]["batch_size"] = 20
    assert parse_config(raw).batch_size == 20
    del raw["lookup"]["batch_size"]
    assert parse_config(raw).batch_size == 10


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such configuration file"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lookup: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
