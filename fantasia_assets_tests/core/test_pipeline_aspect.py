"""`lookup.per_aspect` end to end on the bundled sample: neighbours per GO aspect equal to a float64
oracle over the references annotated in that aspect, each neighbour transferring only the terms of
the aspect it served, and the run-wide outputs (summary, TopGO, predictions) written from them."""

from __future__ import annotations

import h5py
import numpy as np
import polars as pl

from fantasia_assets.config import parse_config
from fantasia_assets.core.references import ReferenceScope
from fantasia_assets.core.transfer import ASPECT_HIT_SCHEMA, ASPECTS
from fantasia_assets.db.stores import AnnotationStore, ReferenceStore
from fantasia_assets.paths import cache_dir
from fantasia_assets.runner import run_lookup
from fantasia_assets_tests.conftest import PROJECT, SAMPLE
from fantasia_assets_tests.core.test_knn import oracle_distances
from fantasia_assets_tests.core.test_pipeline import _config

K = 5


def test_per_aspect_lookup_matches_the_oracle_and_transfers_served_aspects(sample_loaded, tmp_path):
    overrides = {
        "embedding.models.AntiBERTy.enabled": False,
        "embedding.models.NEAR.layer_index": [0],
        "postprocess.alignment": False,
        "lookup.per_aspect": True,
        "scoring.ontology": str(PROJECT / "data" / "sample" / "go-evaluation.obo.gz"),
    }
    config = parse_config(_config(tmp_path, **overrides))
    assert config.per_aspect
    run_lookup(config, sample_loaded)
    base = config.experiment_path
    hits = pl.read_parquet(base / "parquet" / "NEAR" / "layer_0" / "neighbour_hits.parquet")
    assert hits.schema == pl.Schema(ASPECT_HIT_SCHEMA)

    matrix = ReferenceStore(sample_loaded, cache_dir("references")).get(ReferenceScope(1, 0))
    annotations, _ = AnnotationStore(sample_loaded, cache_dir("annotations")).get()
    with h5py.File(SAMPLE / "queries.h5") as handle:
        names = sorted(handle)
        queries = np.stack([handle[f"{n}/type_1/layer_0/embedding"][()] for n in names])
    oracle = oracle_distances(queries, matrix.vectors, "cosine")
    for a, aspect in enumerate(ASPECTS):
        carriers = annotations.filter(pl.col("category") == aspect)["sequence_id"].unique()
        served = np.isin(matrix.sequence_ids, carriers.to_numpy())
        assert 0 < served.sum() < len(served)
        distances = np.where(served, oracle, np.inf)
        order = np.argsort(distances, axis=1, kind="stable")[:, :K]
        for q, name in enumerate(names):
            found = hits.filter(pl.col("accession") == name[len("accession_") :], pl.col("aspect") == aspect)
            assert found["rank"].to_list() == list(range(K)), (name, aspect)
            assert found["ref_idx"].to_list() == matrix.sequence_ids[order[q]].tolist(), (name, aspect)
            np.testing.assert_allclose(found["distance"], distances[q, order[q]], atol=1e-5)
        assert a == ASPECTS.index(aspect)

    raw = pl.read_parquet(base / "parquet" / "NEAR" / "layer_0" / "raw_rows.parquet")
    pairs = raw.select("accession", "ref_idx", "protein_id", "go_id", "category")
    served_pairs = hits.select("accession", "ref_idx", pl.col("aspect").alias("category")).unique()
    # every raw row is a term of the aspect its neighbour served ...
    assert pairs.join(served_pairs, on=["accession", "ref_idx", "category"], how="anti").is_empty()
    # ... and every term of a served aspect is transferred
    expected = served_pairs.join(
        annotations.select(pl.col("sequence_id").alias("ref_idx"), "protein_id", "go_id", "category"),
        on=["ref_idx", "category"],
    )
    assert sorted(expected.rows()) == sorted(pairs.select(expected.columns).rows())
    assert raw.height == pairs.unique().height  # one row per (neighbour × GO term), none twice

    summary = pl.read_csv(base / "summary.csv")
    assert (
        summary.select("accession", "go_id")
        .sort("accession", "go_id")
        .equals(raw.select("accession", "go_id").unique().sort("accession", "go_id"))
    )
    for aspect in ASPECTS:
        topgo = pl.read_csv(
            base / "topgo" / "NEAR" / "layer_0" / f"{aspect}.topgo",
            separator="\t",
            has_header=False,
            new_columns=["accession", "go_id", "ri"],
        )
        best = raw.filter(pl.col("category") == aspect).group_by("accession", "go_id").agg(pl.len())
        assert topgo.height == best.height
    predictions = pl.read_csv(base / "predictions.tsv", separator="\t")
    assert predictions.height and set(predictions["aspect"].unique()) == set(ASPECTS)

    # a rerun is a full search (the aspect masks follow the annotations, so no stored list is
    # trusted), keeps no neighbour lists (only the whole run's FASTA layout, which holds for
    # any search), and writes the same bytes
    before = {p: p.read_bytes() for p in sorted((base / "parquet").rglob("*.parquet"))}
    again = run_lookup(config, sample_loaded)
    (update,) = again.updates.values()
    assert update.kind == "full" and "per_aspect" in update.reason
    assert sorted(p.name for p in (base / "state").rglob("*")) == ["sequences.json", "sequences.parquet"]
    assert {p: p.read_bytes() for p in sorted((base / "parquet").rglob("*.parquet"))} == before


def test_per_aspect_assets_write_what_the_cli_writes(sample_loaded, tmp_path, monkeypatch):
    """neighbour_hits and raw_result_shards of a per-aspect partition, materialised by Dagster
    (which reads the annotation cache for the masks), equal the CLI lookup's Parquet files."""
    import dagster as dg
    import yaml

    from fantasia_assets.defs.lookup import neighbour_hits, raw_result_shards
    from fantasia_assets.defs.partitions import MODEL_LAYER
    from fantasia_assets.defs.resources import (
        ComputeDevice,
        LineageStore,
        LookupSettings,
        MMseqs,
        ReferenceDatabase,
    )

    overrides = {"embedding.models.AntiBERTy.enabled": False, "embedding.models.NEAR.layer_index": [0],
                 "postprocess.alignment": False, "lookup.per_aspect": True}  # fmt: skip
    cli = parse_config(_config(tmp_path / "cli", **overrides))
    run_lookup(cli, sample_loaded)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path / "dagster", **overrides)))
    monkeypatch.setenv("FANTASIA_CONFIG", str(path))
    settings = LookupSettings(config_path=str(path))
    resources = {"settings": settings, "database": ReferenceDatabase(), "device": ComputeDevice(),
                 "mmseqs": MMseqs(), "lineage": LineageStore()}  # fmt: skip
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(MODEL_LAYER.name, ["NEAR|layer_0"])
        result = dg.materialize(
            [neighbour_hits, raw_result_shards],
            resources=resources,
            instance=instance,
            partition_key="NEAR|layer_0",
        )
        assert result.success
    base = settings.load().experiment_path / "parquet" / "NEAR" / "layer_0"
    for name in ("neighbour_hits", "raw_rows"):
        written = pl.read_parquet(base / f"{name}.parquet")
        assert written.equals(
            pl.read_parquet(cli.experiment_path / "parquet/NEAR/layer_0" / f"{name}.parquet")
        )
    hits = pl.read_parquet(base / "neighbour_hits.parquet")
    assert hits.schema == pl.Schema(ASPECT_HIT_SCHEMA) and set(hits["aspect"].unique()) == set(ASPECTS)
