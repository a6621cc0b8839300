"""Configuration cases checked before any work: an unwritable experiment_path, a model without rows."""

from __future__ import annotations

import logging

import pytest

from fantasia_assets import runner
from fantasia_assets.config import ConfigError, parse_config
from fantasia_assets.core.exports import OutputWriteError
from fantasia_assets.runner import run_lookup
from fantasia_assets_tests.hardening.helpers import config_dict, hidden, near_only, tree


def test_experiment_path_that_cannot_be_written__error_before_any_search(
    sample_loaded, tmp_path, monkeypatch
):
    blocker = tmp_path / "a-file"
    blocker.write_text("")

    def no_search(*args, **kwargs):
        raise AssertionError("the queries were read before the output folder was checked")

    monkeypatch.setattr(runner, "open_queries", no_search)
    # a file in the way is found when the configuration is read (`config._refuse_file_in_the_way`)
    with pytest.raises(ConfigError, match=r"a-file/experiment cannot be a folder: .*a-file is a file"):
        run_lookup(parse_config(config_dict(blocker / "experiment", **near_only())), sample_loaded)
    # one that appears after, before the run: the run's own check, still before any search
    config = parse_config(config_dict(tmp_path / "later" / "experiment", **near_only()))
    (tmp_path / "later").write_text("")
    with pytest.raises(OutputWriteError, match=r"cannot write .*later/experiment"):
        run_lookup(config, sample_loaded)


def test_enabled_model_with_no_reference_rows__skipped_with_a_warning_others_written(
    sample_loaded, tmp_path, caplog
):
    # AntiBERTy stays a known model, but every one of its reference embeddings is gone
    with sample_loaded.begin() as conn:
        conn.exec_driver_sql(
            "DELETE FROM sequence_embeddings WHERE embedding_type_id = "
            "(SELECT id FROM sequence_embedding_type WHERE name = 'AntiBERTy')"
        )
    experiment = tmp_path / "experiment"
    overrides = {"embedding.models.NEAR.layer_index": [0]}
    with caplog.at_level(logging.WARNING):
        result = run_lookup(parse_config(config_dict(experiment, **overrides)), sample_loaded)
    assert [p.partition.key for p in result.partitions] == ["NEAR|layer_0"]
    assert "no reference embeddings are loaded for model AntiBERTy" in caplog.text
    assert "taxonomy" not in caplog.text
    assert (experiment / "summary.csv").is_file() and tree(experiment / "raw_results" / "NEAR")
    assert hidden(experiment) == []


@pytest.mark.parametrize(
    ("key", "value"), [("precision", 65536), ("limit_per_entry", 1e9), ("lookup.limit_per_entry", 10**9)]
)
def test_precision_or_limit_per_entry_far_out_of_range__exit_2_naming_the_key_before_any_work(
    key, value, tmp_path, capsys
):
    from fantasia_assets import cli
    from fantasia_assets_tests.hardening.helpers import write_config

    config = write_config(tmp_path / "config.yaml", config_dict(tmp_path / "out", **{key: value}))
    assert cli.main(["lookup", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key.split(".")[-1] in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()
