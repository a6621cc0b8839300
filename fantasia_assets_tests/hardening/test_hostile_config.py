"""Hostile configuration: rejected at the CLI with the key named, never reaching SQL as text."""

from __future__ import annotations

import psycopg
import pytest
import sqlalchemy as sa

from fantasia_assets import cli
from fantasia_assets.config import parse_config
from fantasia_assets.runner import run_lookup
from fantasia_assets_tests.hardening.helpers import config_dict, near_only, write_config


def _counts(engine) -> tuple:
    with engine.connect() as conn:
        return tuple(
            conn.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar()
            for table in ("protein", "sequence_embeddings", "protein_go_term_annotation")
        )


@pytest.mark.parametrize(
    "key, value",
    [
        ("lookup.taxonomy.exclude", ["1) OR 1=1 --"]),
        ("lookup.taxonomy.include_only", ["9606'; DROP TABLE protein; --"]),
        ("lookup.taxonomy.include_only", ["human"]),
        ("lookup.taxonomy.exclude", [9606.5]),
        ("lookup.limit_per_entry", -5),
        ("limit_per_entry", "five"),
        ("limit_execution", "10; DELETE FROM protein"),
        ("embedding.models.NEAR.distance_threshold", "0.5 OR 1=1"),
        ("embedding.models.NEAR.layer_index", "0,1"),
        ("lookup.batch_size", [516]),
        ("lookup.use_gpu", "false"),
        ("lookup.unknown_key", 1),
        ("DB_PASSWORD", "hunter2"),
        ("postprocess.summary.weighted_prefix", ""),
    ],
)
def test_hostile_configuration_value__cli_exits_2_naming_the_key_and_nothing_touched(
    sample_loaded, tmp_path, capsys, key, value
):
    before = _counts(sample_loaded)
    experiment = tmp_path / "experiment"
    config = write_config(tmp_path / "config.yaml", config_dict(experiment, **{key: value}))
    assert cli.main(["lookup", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and key in err and "Traceback" not in err
    assert _counts(sample_loaded) == before
    assert not experiment.exists()


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("experiment_path: {first}\nexperiment_path: {second}\n", "experiment_path", "lines 1 and 2"),
        ("lookup:\n  limit_per_entry: 3\n  batch_size: 8\n  limit_per_entry: 5\n", "lookup.limit_per_entry",
         "lines 2 and 4"),
        ("common: &shared {{k: 1, k: 2}}\nother: *shared\n", "common.k", "lines 1 and 1"),
    ],
)  # fmt: skip
def test_key_given_twice_in_the_yaml__cli_exits_2_naming_it_and_both_lines(
    sample_loaded, tmp_path, capsys, text, key, lines
):
    first, second = tmp_path / "first", tmp_path / "second"
    config = tmp_path / "config.yaml"
    config.write_text(text.format(first=first, second=second))
    before = _counts(sample_loaded)
    assert cli.main(["lookup", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
    assert f"key '{key}' is given twice ({lines})" in err
    assert _counts(sample_loaded) == before
    assert not first.exists() and not second.exists()


def test_taxonomy_ids_and_limits__reach_postgresql_only_as_bound_parameters(
    sample_loaded, tmp_path, monkeypatch
):
    seen: list[tuple[str, object]] = []

    def recording(method):
        def wrapper(self, query, params=None, *args, **kwargs):
            text = query.as_string(self) if isinstance(query, psycopg.sql.Composable) else str(query)
            seen.append((text, params))
            return method(self, query, params, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(psycopg.Cursor, "execute", recording(psycopg.Cursor.execute))
    monkeypatch.setattr(psycopg.Cursor, "copy", recording(psycopg.Cursor.copy))
    overrides = {
        **near_only([0]),
        "lookup.taxonomy.include_only": ["9606", 10116],
        "lookup.taxonomy.exclude": [" 10090 "],
        "limit_execution": 271,
    }
    run_lookup(parse_config(config_dict(tmp_path / "experiment", **overrides)), sample_loaded)
    filtered = [(text, params) for text, params in seen if "taxonomy_id" in text]
    assert filtered, "the taxonomy filter never reached PostgreSQL"
    for text, params in filtered:
        assert not any(value in text for value in ("9606", "10116", "10090")), text
        assert "%(include_taxa)s" in text and params["include_taxa"] == ["10116", "9606"]
        assert params["exclude_taxa"] == ["10090"]
    limited = [params for text, params in filtered if "LIMIT" in text]
    assert limited and all(p["limit"] == 271 for p in limited)
    assert not any("271" in text for text, _ in filtered)
