"""Summary scores and TopGO tables, checked against values computed by hand.

The summary and ensemble run in DuckDB over Parquet, one file per (model, layer) as the lookup
writes them (`test_aggregate.py` holds them to the polars reference on random rows).
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import polars as pl
import pytest

from fantasia_assets.core import aggregate
from fantasia_assets.core.summary import SummarySpec, column_suffix, topgo_tables

T5 = "Prot-T5"
ESM = "ESM/2 x|y"  # odd characters stay in column names as they are
LIMIT = 5

_SCHEMA = {
    "accession": pl.String,
    "model_name": pl.String,
    "embedding_type_id": pl.Int64,
    "layer_index": pl.Int64,
    "distance": pl.Float64,
    "go_id": pl.String,
    "category": pl.String,
    "go_description": pl.String,
    "protein_id": pl.String,
    "reliability_index": pl.Float64,
    "identity": pl.Float64,
    "identity_sw": pl.Float64,
}


def _raw(rows: list[tuple], *, alignment: bool = True) -> pl.DataFrame:
    """Rows as (accession, model, layer, go_id, category, description, protein, ri, identity, identity_sw)."""
    records = [
        (acc, model, 1 if model == T5 else 2, layer, 1.0 - ri, go, cat, desc, prot, ri, ident, ident_sw)
        for acc, model, layer, go, cat, desc, prot, ri, ident, ident_sw in rows
    ]
    frame = pl.DataFrame(records, schema=_SCHEMA, orient="row")
    return frame if alignment else frame.drop("identity", "identity_sw")


# Prot-T5 layer 0 has alignment metrics; the legacy ESM partition has them null.
ROWS = [
    ("A", T5, 0, "GO:1", "P", "growth", "P1", 0.9, 0.5, 0.6),
    ("A", T5, 0, "GO:1", "P", None, "P2", 0.8, 0.3, 0.7),
    ("A", T5, 0, "GO:2", "F", "binding", "P3", 0.7, 0.4, 0.4),
    ("B", T5, 0, "GO:1", "P", "growth", "P1", 0.6, 0.2, 0.25),
    ("A", ESM, None, "GO:1", "P", "growth", "P4", 0.95, None, None),
    ("B", ESM, None, "GO:2", "F", "binding", "P2", 0.5, None, None),
    ("B", ESM, None, "GO:2", "F", "binding", "P5", 0.55, None, None),
]

DEFAULT_SCORES = [
    "max_ri",
    "min_id_g",
    "max_id_g",
    "mean_id_g",
    "min_id_l",
    "max_id_l",
    "mean_id_l",
    "count",
    "w_max_ri",
    "w_max_id_g",
    "w_max_id_l",
    "w_count",
    "final_score",
]


def partition_files(raw: pl.DataFrame | pl.LazyFrame, folder: Path) -> list[Path]:
    """One Parquet file per (model, layer), in order of first appearance, rows in their order."""
    files = []
    for i, (_, frame) in enumerate(
        raw.lazy().collect().group_by("model_name", "layer_index", maintain_order=True)
    ):
        files.append(folder / f"part{i}.parquet")
        frame.write_parquet(files[-1])
    return files


def summarise(raw: pl.DataFrame | pl.LazyFrame, spec: SummarySpec, limit_per_entry: int) -> pl.DataFrame:
    """The DuckDB summary of `raw`, written as partitions, gathered into one frame."""
    with tempfile.TemporaryDirectory() as folder:
        files = partition_files(raw, Path(folder))
        with aggregate.parquet_connection({"raw_rows": files}, Path(folder) / "spill") as rows:
            names, batches = aggregate.summary_batches(rows, spec, limit_per_entry)
            frames = list(batches)
    return pl.concat(frames) if frames else pl.DataFrame(schema=dict.fromkeys(names, pl.String))


def topgo_ensemble(raw: pl.DataFrame | pl.LazyFrame) -> dict[str, pl.DataFrame]:
    with tempfile.TemporaryDirectory() as folder:
        files = partition_files(raw, Path(folder))
        with aggregate.parquet_connection({"raw_rows": files}, Path(folder) / "spill") as rows:
            return aggregate.ensemble_tables(rows)


def _column(frame: pl.DataFrame, name: str) -> list:
    return frame.get_column(name).to_list()


def _assert_close(actual: list, expected: list) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        if e is None:
            assert a is None
        else:
            assert a == pytest.approx(e, abs=1e-12, rel=0)


def test_default_summary_matches_hand_computation() -> None:
    summary = summarise(_raw(ROWS), SummarySpec.default(), LIMIT)

    assert _column(summary, "accession") == ["A", "A", "B", "B"]
    assert _column(summary, "go_id") == ["GO:1", "GO:2", "GO:1", "GO:2"]
    assert _column(summary, "category") == ["P", "F", "P", "F"]
    assert _column(summary, "go_description") == ["growth", "binding", "growth", "binding"]
    assert _column(summary, "term_count") == [3, 1, 1, 2]
    assert _column(summary, "proteins") == ["P1|P2|P4", "P3", "P1", "P2|P5"]

    t5 = f"_{T5}_L0"
    # (A, GO:1): RI 0.9, 0.8; identity 0.5, 0.3; identity_sw 0.6, 0.7; 2 rows of k=5.
    # (A, GO:2): one row, RI 0.7, identity 0.4, identity_sw 0.4.  (B, GO:1): RI 0.6, 0.2, 0.25.
    _assert_close(_column(summary, "max_ri" + t5), [0.9, 0.7, 0.6, None])
    _assert_close(_column(summary, "min_id_g" + t5), [0.3, 0.4, 0.2, None])
    _assert_close(_column(summary, "max_id_g" + t5), [0.5, 0.4, 0.2, None])
    _assert_close(_column(summary, "mean_id_g" + t5), [0.4, 0.4, 0.2, None])  # (0.5 + 0.3) / 2
    _assert_close(_column(summary, "min_id_l" + t5), [0.6, 0.4, 0.25, None])
    _assert_close(_column(summary, "max_id_l" + t5), [0.7, 0.4, 0.25, None])
    _assert_close(_column(summary, "mean_id_l" + t5), [0.65, 0.4, 0.25, None])  # (0.6 + 0.7) / 2
    _assert_close(_column(summary, "count" + t5), [0.4, 0.2, 0.2, None])  # 2/5, 1/5, 1/5
    _assert_close(_column(summary, "w_max_ri" + t5), [0.36, 0.28, 0.24, None])  # 0.4 × max_ri
    _assert_close(_column(summary, "w_max_id_g" + t5), [0.1, 0.08, 0.04, None])  # 0.2 × max_id_g
    _assert_close(_column(summary, "w_max_id_l" + t5), [0.14, 0.08, 0.05, None])  # 0.2 × max_id_l
    _assert_close(_column(summary, "w_count" + t5), [0.08, 0.04, 0.04, None])  # 0.2 × count
    # 0.36 + 0.1 + 0.14 + 0.08; 0.28 + 0.08 + 0.08 + 0.04; 0.24 + 0.04 + 0.05 + 0.04
    _assert_close(_column(summary, "final_score" + t5), [0.68, 0.48, 0.37, None])

    esm = f"_{ESM}_Llegacy"
    # (A, GO:1): RI 0.95, 1 row; (B, GO:2): RI 0.5, 0.55, 2 rows; identities null → count 0.
    _assert_close(_column(summary, "max_ri" + esm), [0.95, None, None, 0.55])
    _assert_close(_column(summary, "max_id_g" + esm), [None] * 4)
    _assert_close(_column(summary, "mean_id_l" + esm), [None] * 4)
    _assert_close(_column(summary, "count" + esm), [0.2, None, None, 0.4])
    _assert_close(_column(summary, "w_max_id_g" + esm), [0.0, None, None, 0.0])
    # 0.4 × 0.95 + 0 + 0 + 0.2 × 0.2 = 0.42; 0.4 × 0.55 + 0.2 × 0.4 = 0.30
    _assert_close(_column(summary, "final_score" + esm), [0.42, None, None, 0.30])


def test_summary_column_order_is_deterministic() -> None:
    summary = summarise(_raw(ROWS), SummarySpec.default(), LIMIT)
    # "ESM/2 x|y" sorts before "Prot-T5"; within a partition the spec order holds.
    expected = [
        "accession",
        "go_id",
        "category",
        "go_description",
        *(f"{name}_{ESM}_Llegacy" for name in DEFAULT_SCORES),
        *(f"{name}_{T5}_L0" for name in DEFAULT_SCORES),
        "term_count",
        "proteins",
    ]
    assert summary.columns == expected
    shuffled = _raw(ROWS).sample(fraction=1.0, shuffle=True, seed=7)
    assert summarise(shuffled.lazy(), SummarySpec.default(), LIMIT).equals(summary)


def test_partitions_sort_by_model_then_numeric_layer_with_legacy_last() -> None:
    rows = [
        ("A", "b", 1, "GO:1", "P", "x", "P1", 0.5, 0.5, 0.5),
        ("A", "a", 10, "GO:1", "P", "x", "P1", 0.5, 0.5, 0.5),
        ("A", "a", None, "GO:1", "P", "x", "P1", 0.5, 0.5, 0.5),
        ("A", "a", 2, "GO:1", "P", "x", "P1", 0.5, 0.5, 0.5),
    ]
    spec = SummarySpec(metrics={"reliability_index": ["max"]}, aliases={}, weights={"reliability_index": 1})
    summary = summarise(_raw(rows), spec, LIMIT)
    suffixes = ["a_L2", "a_L10", "a_Llegacy", "b_L1"]
    per_partition = ["max_reliability_index", "count", "w_max_reliability_index", "final_score"]
    assert summary.columns[4:-2] == [f"{name}_{s}" for s in suffixes for name in per_partition]
    assert column_suffix("a", None) == "a_Llegacy"


def test_missing_alignment_columns_count_as_zero() -> None:
    summary = summarise(_raw(ROWS, alignment=False), SummarySpec.default(), LIMIT)
    t5 = f"_{T5}_L0"
    _assert_close(_column(summary, "max_id_g" + t5), [None, None, None, None])
    _assert_close(_column(summary, "w_max_id_l" + t5), [0.0, 0.0, 0.0, None])
    # 0.4 × 0.9 + 0.2 × 0.4 = 0.44; 0.4 × 0.7 + 0.2 × 0.2 = 0.32; 0.4 × 0.6 + 0.2 × 0.2 = 0.28
    _assert_close(_column(summary, "final_score" + t5), [0.44, 0.32, 0.28, None])


def _weights(spec: SummarySpec) -> dict[str, float | None]:
    return {c.name: c.weight for c in spec.columns()}


def test_full_name_weight_beats_metric_weight() -> None:
    spec = SummarySpec(
        metrics={"identity": ["min", "max"]},
        aliases={"identity": "id_g"},
        weights={"identity": 1.0, "max_id_g": 3.0},
        include_counts=False,
    )
    assert _weights(spec) == {"min_id_g": 0.25, "max_id_g": 0.75}  # 1/(1+3), 3/(1+3)


def test_metric_number_beats_alias_number_and_any_dict() -> None:
    spec = SummarySpec(
        metrics={"identity": ["min", "max"]},
        aliases={"identity": "id_g"},
        weights={"id_g": 3.0, "identity": {"max": 9.0}},
        include_counts=False,
    )
    # a plain number (here on the alias) is step 2, the {agg: w} dict only step 3
    assert _weights(spec) == {"min_id_g": 0.5, "max_id_g": 0.5}
    spec = SummarySpec(
        metrics={"identity": ["max"], "identity_sw": ["max"]},
        aliases={"identity": "id_g", "identity_sw": "id_l"},
        weights={"identity": 1.0, "id_g": 3.0, "id_l": 3.0},
        include_counts=False,
    )
    assert _weights(spec) == {"max_id_g": 0.25, "max_id_l": 0.75}  # metric 1 over alias 3


def test_dict_weights_normalise_and_unweighted_outputs_get_no_column() -> None:
    spec = SummarySpec(
        metrics={"reliability_index": ["min", "max"], "identity": ["max"]},
        aliases={"reliability_index": "ri", "identity": "id_g"},
        weights={"ri": {"max": 2.0}, "identity": {"max": 1.0}, "count": 1.0},
    )
    # Σw = 2 + 1 + 1 = 4; min_ri finds no weight
    assert _weights(spec) == {"min_ri": None, "max_ri": 0.5, "max_id_g": 0.25, "count": 0.25}
    summary = summarise(_raw(ROWS), spec, LIMIT)
    t5 = f"_{T5}_L0"
    assert f"min_ri{t5}" in summary.columns
    assert f"w_min_ri{t5}" not in summary.columns
    # (A, GO:1): 0.5 × 0.9 + 0.25 × 0.5 + 0.25 × 0.4 = 0.45 + 0.125 + 0.1
    _assert_close(_column(summary, "final_score" + t5)[:1], [0.675])


def test_avg_is_mean_and_unknown_aggregations_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    spec = SummarySpec(
        metrics={"reliability_index": ["avg", "median"]},
        aliases={"reliability_index": "ri"},
        weights={"ri": {"mean": 1.0}},
        include_counts=False,
        weighted_prefix="weighted_",
    )
    with caplog.at_level(logging.WARNING, logger="fantasia_assets.core.summary"):
        summary = summarise(_raw(ROWS), spec, LIMIT)
    assert "median" in caplog.text
    t5 = f"_{T5}_L0"
    assert [c for c in summary.columns if c.endswith(t5)] == [
        f"avg_ri{t5}",
        f"weighted_avg_ri{t5}",
        f"final_score{t5}",
    ]
    _assert_close(_column(summary, "avg_ri" + t5), [0.85, 0.7, 0.6, None])  # (0.9 + 0.8) / 2
    _assert_close(_column(summary, "final_score" + t5), [0.85, 0.7, 0.6, None])  # sole weight → 1


def test_bad_weights_are_reported_with_their_key(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match="weights.identity.max"):
        SummarySpec(metrics={"identity": ["max"]}, aliases={}, weights={"identity": {"max": -1}})
    with pytest.raises(ValueError, match="no positive weight"):
        SummarySpec(metrics={"identity": ["max"]}, aliases={}, weights={"idnetity": 1}).columns()
    assert "idnetity" in caplog.text
    with pytest.raises(ValueError, match="metrics.identity"):
        SummarySpec(metrics={"identity": "max"}, aliases={}, weights={"count": 1})
    with pytest.raises(ValueError, match="produced twice"):
        SummarySpec(
            metrics={"identity": ["max"], "identity_sw": ["max"]},
            aliases={"identity_sw": "identity"},
            weights={"count": 1},
        ).columns()
    with pytest.raises(ValueError, match="limit_per_entry"):
        summarise(_raw(ROWS), SummarySpec.default(), 0)


def test_topgo_per_model_layer_keeps_best_reliability() -> None:
    rows = [
        *ROWS,
        ("A", T5, 0, "GO:1", "P", "growth", "P6", 0.85, 0.1, 0.1),
        ("A", T5, 1, "GO:3", "C", "membrane", "P7", 0.3, 0.1, 0.1),
    ]
    tables = topgo_tables(_raw(rows))
    assert list(tables) == [(ESM, None, "F"), (ESM, None, "P"), (T5, 0, "F"), (T5, 0, "P"), (T5, 1, "C")]
    assert tables[(T5, 0, "P")].rows() == [("A", "GO:1", 0.9), ("B", "GO:1", 0.6)]
    assert tables[(T5, 0, "F")].rows() == [("A", "GO:2", 0.7)]
    assert tables[(ESM, None, "F")].rows() == [("B", "GO:2", 0.55)]
    assert tables[(ESM, None, "P")].rows() == [("A", "GO:1", 0.95)]
    assert tables[(T5, 1, "C")].columns == ["accession", "go_id", "reliability_index"]


def test_topgo_ensemble_keeps_best_over_models_and_layers() -> None:
    ensemble = topgo_ensemble(_raw(ROWS).lazy())
    assert list(ensemble) == ["F", "P"]
    # (A, GO:1): max(0.9, 0.8, 0.95); (B, GO:1): 0.6; (A, GO:2): 0.7; (B, GO:2): max(0.5, 0.55)
    assert ensemble["P"].rows() == [("A", "GO:1", 0.95), ("B", "GO:1", 0.6)]
    assert ensemble["F"].rows() == [("A", "GO:2", 0.7), ("B", "GO:2", 0.55)]
