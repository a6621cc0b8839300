"""The `scoring_model` asset materialised on the sample: a real model file fitted on the sample
queries labelled by their mouse GOA slice, recording its features, partitions and training data."""

from __future__ import annotations

import hashlib
import pickle

import dagster as dg
import polars as pl
import yaml

from fantasia_assets.core import scorer as sc
from fantasia_assets.defs.resources import LookupSettings, ReferenceDatabase
from fantasia_assets.runner import run_lookup
from fantasia_assets_tests.conftest import PROJECT, SAMPLE


def test_scoring_model_asset_writes_a_model_of_the_configured_partitions(
    sample_loaded, tmp_path, monkeypatch
):
    from fantasia_assets.core.scoring import ScoringSettings, run_predictions
    from fantasia_assets.defs.science import TruthAnnotations, scoring_model

    raw = yaml.safe_load((PROJECT / "data" / "config.yaml").read_text())
    raw["experiment_path"] = str(tmp_path / "experiment")
    raw["embeddings_path"] = str(SAMPLE / "queries.h5")
    raw["embedding"]["models"]["AntiBERTy"]["enabled"] = False
    raw["embedding"]["models"]["NEAR"]["layer_index"] = [0, 1]
    raw["postprocess"]["alignment"] = False  # the features without alignment: a smaller, faster case
    raw["scoring"] = {"ontology": str(SAMPLE / "go-evaluation.obo.gz")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("FANTASIA_CONFIG", str(path))
    settings = LookupSettings(config_path=str(path))
    config = settings.load()
    run_lookup(config, sample_loaded)
    gaf = SAMPLE / "queries_truth.gaf.gz"
    with dg.instance_for_test() as instance:
        result = dg.materialize(
            [scoring_model],
            resources={
                "settings": settings,
                "database": ReferenceDatabase(),
                "truth": TruthAnnotations(gaf_paths=str(gaf)),
            },
            instance=instance,
        )
        assert result.success
        metadata = result.asset_materializations_for_node("scoring_model")[0].metadata
    out = config.experiment_path / "scoring" / "model.pkl"
    assert metadata["model"].value == str(out)
    model = sc.load_scorer(out)
    partitions = ["NEAR|layer_0", "NEAR|layer_1"]
    assert model.partitions == partitions == metadata["partitions"].value
    assert model.features == sc.feature_names(partitions, aligned=False)
    assert "identity_max@NEAR|layer_0" not in model.features and "votes@NEAR|layer_1" in model.features
    assert model.per_aspect is False
    assert set(model.versions) == {"lightgbm", "scikit-learn", "polars"}
    assert model.training_hashes[str(gaf)] == hashlib.sha256(gaf.read_bytes()).hexdigest()
    assert len(model.training_hashes["features"]) == 64
    assert len(model.models) == 5  # one calibrated booster per protein fold
    assert 0.5 < model.cross_validation["auc_out_of_fold"] <= 1.0
    assert metadata["proteins"].value > 5 and 0 < metadata["positives"].value < metadata["candidates"].value
    assert pickle.loads(out.read_bytes())["format"] == sc.FORMAT

    # the file it wrote scores this lookup's predictions.tsv
    rows = pl.concat(
        [pl.read_parquet(p) for p in sorted(config.experiment_path.glob("parquet/NEAR/*/raw_rows.parquet"))]
    )
    written = run_predictions(tmp_path, rows, ScoringSettings(config.scoring.ontology, out), 4)
    predictions = pl.read_csv(written["predictions"], separator="\t")
    assert predictions.height and predictions["score"].is_between(0, 1).all()
