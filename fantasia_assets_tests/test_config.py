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


def _model(config, name: str):
    return next(m for m in config.models if m.name == name)


def test_sample_config_parses_with_every_key():
    config = load_config(PROJECT / "data" / "config.yaml")
    assert config.limit_per_entry == 5 and config.batch_size == 516 and config.precision == 4
    assert [m.name for m in config.enabled_models()] == ["NEAR", "AntiBERTy"]
    assert _model(config, "NEAR").layer_index == (0, 1)
    assert config.summary.weighted_prefix == "w_"
    assert config.redundancy.identity == 0.0


@pytest.mark.parametrize("value", [None, False, "off", "None", "null", 0, -1])
def test_threshold_off_values(value):
    assert (
        _model(
            parse_config(_with("embedding.models.NEAR.distance_threshold", value)), "NEAR"
        ).distance_threshold
        is None
    )


def test_threshold_number():
    config = parse_config(_with("embedding.models.NEAR.distance_threshold", 0.25))
    assert _model(config, "NEAR").distance_threshold == 0.25


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


@pytest.mark.parametrize(
    "path, value, key",
    [
        ("postprocess.summary.weights", {"max_ri": 0, "count": 0}, "postprocess.summary.weights"),
        (
            "postprocess.summary.aliases",
            {"identity": "id", "identity_sw": "id"},
            "postprocess.summary.aliases",
        ),
        (
            "postprocess.summary.metrics",
            {"reliabilty_index": ["max"]},
            "postprocess.summary.metrics.reliabilty_index",
        ),
        ("postprocess.summary.metrics", {"identity": ["median"]}, "postprocess.summary.metrics.identity"),
        ("postprocess.summary.weights", {"max_idg": 1}, "postprocess.summary.weights.max_idg"),
        (
            "postprocess.summary.weights",
            {"identity": {"medain": 1}},
            "postprocess.summary.weights.identity.medain",
        ),
        (  # `count` names one output: a weight by aggregation would apply to nothing
            "postprocess.summary.weights",
            {"reliability_index": {"max": 1}, "count": {"max": 5}},
            "postprocess.summary.weights.count: names one output",
        ),
        (  # the sample summarises reliability_index by max alone: `min` would weigh nothing
            "postprocess.summary.weights",
            {"ri": {"max": 1, "min": 3}, "count": 1},
            "postprocess.summary.weights.ri.min: applies to no output: ri is summarised by max only",
        ),
        ("postprocess.store_workers", 4, "postprocess.store_workers"),
        ("postprocess.alignment_threads", 0, "postprocess.alignment_threads"),
        ("precision", 17, "precision"),
        ("lookup.limit_per_entry", 100_000, "lookup.limit_per_entry"),
        ("lookup.lookup_cache_max", -1, "lookup.lookup_cache_max"),
        ("lookup.screening", "fp16", "lookup.screening"),
        (
            "lookup",
            {"screening": "bf16", "backend": "scipy"},
            "lookup.screening: 'bf16' needs lookup.backend",
        ),
        (
            "lookup",
            {"screening": "int8", "backend": "numpy"},
            "lookup.screening: 'int8' needs lookup.backend",
        ),
        (
            "lookup",
            {"screening": "int8", "distance_metric": "euclidean"},
            "lookup.screening: 'int8' screens cosine only",
        ),
        ("limit_execution", 0, "limit_execution"),
    ],
)
def test_unusable_summary_and_out_of_range_values_name_their_key(path, value, key):
    with pytest.raises(ConfigError) as error:
        parse_config(_with(path, value))
    assert key in str(error.value)


def test_summary_spec_reaches_the_config_and_alignment_threads_have_their_own_key():
    raw = _with("postprocess.summary.weights", {"max_ri": 1})
    raw["postprocess"]["summary"]["metrics"] = {"reliability_index": ["max"], "distance": ["min"]}
    raw["postprocess"]["alignment_threads"] = 3
    config = parse_config(raw)
    assert [c.name for c in config.summary.columns()] == ["max_ri", "min_distance", "count"]
    assert [c.weight for c in config.summary.columns()] == [1.0, None, None]
    assert config.alignment_threads == 3


def test_sections_left_empty_take_the_defaults():
    raw = copy.deepcopy(BASE)
    raw["lookup"] = None
    raw["postprocess"] = None
    config = parse_config(raw)
    assert (config.limit_per_entry, config.topgo, config.alignment_threads) == (5, True, 4)
    assert config.summary == parse_config(BASE).summary


@pytest.mark.parametrize(
    "path, value, key",
    [
        (
            "postprocess.summary.weights",
            {"max_ri": 0, "max_id_g": 0, "max_id_l": 0, "count": 0},
            "postprocess.summary.weights",
        ),
        (
            "postprocess.summary.aliases",
            {"identity": "same", "identity_sw": "same"},
            "postprocess.summary.aliases",
        ),
        (
            "postprocess.summary.metrics",
            {"reliabilty_index": ["max"]},
            "postprocess.summary.metrics.reliabilty_index",
        ),
        ("postprocess.store_workers", 2, "postprocess.store_workers"),
    ],
)
def test_cli_lookup_with_an_unusable_config__exits_2_naming_the_key_before_any_search(
    tmp_path, capsys, monkeypatch, path, value, key
):
    from fantasia_assets import cli, runner

    def no_search(*args, **kwargs):
        raise AssertionError("the lookup started")

    monkeypatch.setattr(runner, "run_lookup", no_search)
    raw = _with(path, value)
    raw["experiment_path"] = str(tmp_path / "experiment")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    assert cli.main(["lookup", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err and "Traceback" not in err
    assert not (tmp_path / "experiment").exists()


def test_a_misspelt_choice_is_shown_and_other_text_never(tmp_path):
    raw = yaml.safe_load((PROJECT / "data" / "config.yaml").read_text())
    raw["lookup"]["distance_metric"] = "cosin"
    with pytest.raises(ConfigError, match=r"lookup.distance_metric: expected one of .*, got 'cosin'"):
        parse_config(raw)
    raw["lookup"]["distance_metric"] = "s3cret pass phrase!"  # not a word: never echoed
    with pytest.raises(ConfigError) as error:
        parse_config(raw)
    assert "got a string" in str(error.value) and "s3cret" not in str(error.value)


def test_a_cosine_threshold_of_2_or_more_keeps_everything_and_says_so(caplog):
    raw = yaml.safe_load((PROJECT / "data" / "config.yaml").read_text())
    raw["embedding"]["models"]["NEAR"]["distance_threshold"] = 3
    with caplog.at_level("WARNING"):
        config = parse_config(raw)
    assert next(m for m in config.models if m.name == "NEAR").distance_threshold == 3  # as written
    assert "embedding.models.NEAR.distance_threshold 3: cosine distances are at most 2" in caplog.text
    caplog.clear()
    raw["lookup"]["distance_metric"] = "euclidean"
    with caplog.at_level("WARNING"):
        parse_config(raw)
    assert "distance_threshold" not in caplog.text
