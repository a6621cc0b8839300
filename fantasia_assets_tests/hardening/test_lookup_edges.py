"""Lookups at the edges of the search: a (model, layer) left without neighbours beside one that has
some, and a query vector too long for the euclidean search. The run finishes, and what it cannot
use is left out by name."""

from __future__ import annotations

import logging

import numpy as np
import polars as pl
import pytest

from fantasia_assets.config import parse_config
from fantasia_assets.core import scorer as sc
from fantasia_assets.runner import run_lookup
from fantasia_assets_tests.conftest import SAMPLE
from fantasia_assets_tests.hardening.helpers import config_dict, near_only, sample_groups, write_queries

ONTOLOGY = SAMPLE / "go-evaluation.obo.gz"


def _skipped(experiment) -> list[tuple]:
    frame = pl.read_csv(experiment / "skipped_queries.csv", schema_overrides={"partition": pl.String})
    return frame.rows()


def _shards(experiment, layer: int = 0) -> set[str]:
    return {p.stem for p in (experiment / "raw_results" / "NEAR" / f"layer_{layer}").glob("*.csv")}


def _constant_scorer(path, aligned: bool) -> None:
    """A scoring model for NEAR layers 0 and 1 that gives every candidate 0.5."""
    partitions = ["NEAR|layer_0", "NEAR|layer_1"]
    names = sc.feature_names(partitions, aligned)
    # LightGBM, as a trained model holds (the model file admits no other class): one tree without
    # a split on constant features, so every probability is the prior, 0.5
    import lightgbm

    model = lightgbm.LGBMClassifier(n_estimators=1, min_child_samples=1, verbose=-1)
    model.fit(np.zeros((2, len(names))), [0, 1])
    terms = pl.DataFrame(
        schema={"go_id": pl.String, "term_frequency": pl.Float64, "information_content": pl.Float64}
    )
    sc.save_scorer(path, sc.Scorer([model], names, partitions, terms, versions={}, training_hashes={}))


@pytest.mark.parametrize("scorer", ["heuristic", "learned"])
def test_threshold_that_leaves_one_layer_without_neighbours__run_finishes_and_predictions_count_every_layer(
    sample_loaded, tmp_path, scorer
):
    # on the sample, a distance threshold of 1e-9 keeps one neighbour (a query whose layer 0
    # vector is a reference's) in layer 0 and none in layer 1; alignment on, as shipped
    model = tmp_path / "scorer.pkl"
    if scorer == "learned":
        _constant_scorer(model, aligned=True)
    experiment = tmp_path / "experiment"
    overrides = {
        **near_only([0, 1]),
        "embedding.models.NEAR.distance_threshold": 1e-9,
        "postprocess.alignment": True,
        "scoring.ontology": str(ONTOLOGY),
        "scoring.model": str(model) if scorer == "learned" else None,
    }
    result = run_lookup(parse_config(config_dict(experiment, **overrides)), sample_loaded)
    hits = {p.partition.key: p.n_hits for p in result.partitions}
    assert hits["NEAR|layer_0"] >= 1 and hits["NEAR|layer_1"] == 0  # the edge this test is about
    # the empty layer's raw rows carry the types of the full one's
    parquet = experiment / "parquet" / "NEAR"
    full, empty = (pl.read_parquet(parquet / f"layer_{k}" / "raw_rows.parquet") for k in (0, 1))
    assert empty.height == 0 and full.height > 0
    assert empty.schema == full.schema
    assert empty.schema["identity"] == pl.Float64 and empty.schema["alignment_length"] == pl.Int64
    predictions = pl.read_csv(experiment / "predictions.tsv", separator="\t")
    assert predictions.height > 0
    assert set(predictions["accession"]) == set(full["accession"])
    if scorer == "heuristic":
        # the mean over both layers: the one without neighbours votes 0
        assert predictions["score"].max() <= 0.5
    else:
        assert set(predictions["score"]) == {0.5}
    summary = pl.read_csv(experiment / "summary.csv")
    assert set(summary["accession"]) == set(full["accession"])
    assert (experiment / "topgo" / "NEAR" / "layer_1").is_dir()


def test_euclidean_query_vector_too_long_to_square__that_query_left_out_with_a_warning(
    sample_loaded, tmp_path, caplog
):
    groups = sample_groups(5)
    clean = write_queries(tmp_path / "clean.h5", groups)
    vector = groups[2][1]["type_1/layer_0/embedding"]
    groups[2][1]["type_1/layer_0/embedding"] = vector * np.float32(1e20)  # finite; its square is not
    huge = write_queries(tmp_path / "huge.h5", groups)
    bad = groups[2][0]
    others = {name[len("accession_") :] for name, _ in groups} - {bad[len("accession_") :]}
    reason = "type_1/layer_0 has a norm ≥ 2^56: its squared distances would overflow float32"

    def lookup(experiment, queries, metric="euclidean", backend="torch"):
        overrides = {
            "lookup.distance_metric": metric,
            "lookup.backend": backend,
            "scoring.ontology": str(ONTOLOGY),
        }
        return run_lookup(
            parse_config(config_dict(experiment, queries, **near_only([0]), **overrides)), sample_loaded
        )

    for backend in ("torch", "numpy", "scipy"):
        experiment = tmp_path / backend
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            result = lookup(experiment, huge, backend=backend)
        assert f"{huge}: {bad} left out of NEAR|layer_0: {reason}" in caplog.text, backend
        assert _skipped(experiment) == [(bad, "NEAR|layer_0", reason)]
        assert _shards(experiment) == others
        assert result.partitions[0].skipped == 1 and result.partitions[0].n_queries == 4

    # a re-run into a folder that searched the clean file: the same, as an incremental update
    again = tmp_path / "again"
    lookup(again, clean)
    lookup(again, huge)
    assert _skipped(again) == [(bad, "NEAR|layer_0", reason)]
    assert (again / "summary.csv").read_bytes() == (tmp_path / "torch" / "summary.csv").read_bytes()

    # cosine normalises first: the same vector is searched
    cosine = tmp_path / "cosine"
    lookup(cosine, huge, "cosine")
    assert _skipped(cosine) == []
    assert _shards(cosine) == others | {bad[len("accession_") :]}


def test_dagster_predictions_of_a_run_with_one_layer_without_neighbours__same_file_as_the_cli(
    sample_loaded, tmp_path, monkeypatch
):
    import dagster as dg

    from fantasia_assets.defs.resources import LookupSettings, ReferenceDatabase
    from fantasia_assets.defs.science import predictions
    from fantasia_assets_tests.hardening.helpers import write_config

    experiment = tmp_path / "experiment"
    overrides = {
        **near_only([0, 1]),
        "embedding.models.NEAR.distance_threshold": 1e-9,
        "postprocess.alignment": False,
        "scoring.ontology": str(ONTOLOGY),
    }
    path = write_config(tmp_path / "config.yaml", config_dict(experiment, **overrides))
    monkeypatch.setenv("FANTASIA_CONFIG", str(path))
    settings = LookupSettings(config_path=str(path))
    result = run_lookup(settings.load(), sample_loaded)
    assert {p.partition.key: p.n_hits for p in result.partitions}["NEAR|layer_1"] == 0
    by_cli = (experiment / "predictions.tsv").read_bytes()
    (experiment / "predictions.tsv").unlink()
    with dg.instance_for_test() as instance:
        materialised = dg.materialize(
            [predictions],
            resources={"settings": settings, "database": ReferenceDatabase()},
            instance=instance,
        )
        assert materialised.success
    assert (experiment / "predictions.tsv").read_bytes() == by_cli
    assert pl.read_csv(experiment / "predictions.tsv", separator="\t")["score"].max() <= 0.5
