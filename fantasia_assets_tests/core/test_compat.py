"""`postprocess.fantasia_compat`: FANTASIA 4.1.1's conventions, checked against values computed by hand."""

from __future__ import annotations

import h5py
import polars as pl

from fantasia_assets.config import parse_config
from fantasia_assets.core import compat, exports
from fantasia_assets.core.summary import SummarySpec, summarise, topgo_tables
from fantasia_assets.runner import run_lookup
from fantasia_assets_tests.conftest import SAMPLE
from fantasia_assets_tests.hardening.helpers import config_dict, near_only

PRECISION = 4
LIMIT = 5
SCHEMA = {
    "accession": pl.String, "model_name": pl.String, "layer_index": pl.Int64, "go_id": pl.String,
    "category": pl.String, "go_description": pl.String, "protein_id": pl.String,
    "reliability_index": pl.Float64, "identity": pl.Float64, "identity_sw": pl.Float64,
}  # fmt: skip
# (accession, layer, go_id, protein, ri, identity, identity_sw); model NEAR, category P
ROWS = [
    ("Q1", 0, "GO:1", "P1", 0.91238, 0.50038, 0.61138),
    ("Q1", 0, "GO:1", "P2", 0.85, 0.3, 0.2),
    ("Q1", 0, "GO:1", "P3", 0.91241, 0.1, 0.1),  # RI 0.9124 as written, like P1's
    ("Q1", 1, "GO:2", "P1", 0.7, 0.5, 0.5),
]


def _raw() -> pl.DataFrame:
    records = [(a, "NEAR", layer, go, "P", "term", p, ri, i, s) for a, layer, go, p, ri, i, s in ROWS]
    return pl.DataFrame(records, schema=SCHEMA, orient="row")


def _row(frame: pl.DataFrame, go_id: str) -> dict:
    return frame.filter(pl.col("go_id") == go_id).row(0, named=True)


def test_summary_sums_rounded_terms_of_rounded_raw_values():
    spec = SummarySpec.default()
    exact = _row(summarise(_raw(), spec, LIMIT), "GO:1")
    fantasia = _row(compat.summary(_raw(), spec, LIMIT, PRECISION), "GO:1")
    # exact: 0.4·0.91241 + 0.2·0.50038 + 0.2·0.61138 + 0.2·3/5
    assert abs(exact["final_score_NEAR_L0"] - (0.364964 + 0.100076 + 0.122276 + 0.12)) < 1e-12
    # FANTASIA: raw values as written (0.9124, 0.5004, 0.6114), each weighted term rounded
    # (0.36496 → 0.3650, 0.10008 → 0.1001, 0.12228 → 0.1223, 0.12 → 0.1200), then summed
    expected_terms = {"w_max_ri": 0.365, "w_max_id_g": 0.1001, "w_max_id_l": 0.1223, "w_count": 0.12}
    for name, value in expected_terms.items():
        assert abs(fantasia[f"{name}_NEAR_L0"] - value) < 1e-12, name
    assert abs(fantasia["final_score_NEAR_L0"] - 0.7074) < 1e-12
    assert f"{exact['final_score_NEAR_L0']:.4f}" == "0.7073"  # the exact score, as written, differs
    assert abs(fantasia["mean_id_g_NEAR_L0"] - (0.5004 + 0.3 + 0.1) / 3) < 1e-12
    # a term a partition did not transfer keeps nulls in that partition's columns
    assert fantasia["final_score_NEAR_L1"] is None and fantasia["w_max_ri_NEAR_L1"] is None
    other = _row(compat.summary(_raw(), spec, LIMIT, PRECISION), "GO:2")
    assert other["final_score_NEAR_L0"] is None
    assert abs(other["final_score_NEAR_L1"] - (0.28 + 0.1 + 0.1 + 0.04)) < 1e-12


def test_topgo_keeps_one_line_per_distinct_written_ri():
    fantasia = compat.topgo_tables(_raw(), PRECISION)[("NEAR", 0, "P")]
    assert fantasia.rows() == [("Q1", "GO:1", 0.9124), ("Q1", "GO:1", 0.85)]
    assert topgo_tables(_raw())[("NEAR", 0, "P")].rows() == [("Q1", "GO:1", 0.91241)]


def test_lookup_in_compat_mode(sample_loaded, tmp_path):
    config = parse_config(
        config_dict(tmp_path / "experiment", **near_only([0]), **{"postprocess.fantasia_compat": True})
    )
    assert config.fantasia_compat and not parse_config(config_dict(tmp_path / "x")).fantasia_compat
    run_lookup(config, sample_loaded)
    base = config.experiment_path
    raw = pl.read_parquet(base / "parquet" / "NEAR" / "layer_0" / "raw_rows.parquet")
    with h5py.File(SAMPLE / "queries.h5") as handle:
        accessions = [k.removeprefix("accession_") for k in handle]
    names = exports.unique_file_names(accessions, ".csv")
    shards = base / "raw_results" / "NEAR" / "layer_0"
    assert sorted(p.name for p in shards.iterdir()) == sorted(n.lower() for n in names.values())
    assert any(n != n.lower() for n in names.values())  # the sample's accessions are upper case
    shard = pl.read_csv(shards / names[raw["accession"][0]].lower())
    assert shard.columns[-2:] == ["length_query", "length_reference"]
    assert shard["length_query"].to_list() == shard["query_len"].to_list()
    assert shard["length_reference"].to_list() == shard["ref_len"].to_list()

    summary = pl.read_csv(base / "summary.csv")
    exact = summarise(raw, config.summary, config.limit_per_entry)
    assert summary.columns == exact.columns
    difference = (summary["final_score_NEAR_L0"] - exact["final_score_NEAR_L0"]).abs()
    # raw values rounded (≤ 0.5e-4 × weights summing to 0.8), four terms rounded (≤ 4 × 0.5e-4),
    # the written score rounded (≤ 0.5e-4)
    assert 0 < difference.max() <= 2.9e-4 + 1e-9

    lines = pl.read_csv(
        base / "topgo" / "NEAR" / "layer_0" / "P.topgo", separator="\t", has_header=False,
        new_columns=["accession", "go_id", "reliability_index"],
    )  # fmt: skip
    best = topgo_tables(raw)[("NEAR", 0, "P")]
    assert lines.height > best.height
    assert (
        lines.group_by("accession", "go_id")
        .agg(pl.col("reliability_index").max())
        .sort("accession", "go_id")
        .equals(compat.as_written(best, ["reliability_index"], PRECISION))
    )


def test_summary_of_the_same_rows_in_any_order__the_same_values_to_the_last_bit():
    """Means summed in the rows' order moved in the last bit with the order the rows came in
    (threads), and a mean at a rounding boundary then printed one digit apart between runs."""
    import numpy as np

    rng = np.random.default_rng(7)
    n = 6000
    records = [
        (f"Q{i % 400}", "NEAR", 0, f"GO:{i % 7}", "P", "term", f"P{i}", *np.round(rng.random(3), 4).tolist())
        for i in range(n)
    ]
    raw = pl.DataFrame(records, schema=SCHEMA, orient="row")
    spec = SummarySpec.default()
    first = compat.summary(raw, spec, LIMIT, PRECISION)
    for seed in range(3):
        shuffled = compat.summary(raw.sample(fraction=1.0, shuffle=True, seed=seed), spec, LIMIT, PRECISION)
        assert shuffled.equals(first), seed
