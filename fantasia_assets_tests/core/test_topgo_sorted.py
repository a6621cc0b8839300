"""`topgo_tables` (rows sorted first, grouped in that order) equals grouping by the five columns
and sorting the groups, on hostile rows: null keys (legacy layer, accession, GO id), NaN, ±0.0,
±inf, null categories and indices, ties between equal terms, several models and layers."""

from __future__ import annotations

import math
import random

import polars as pl
import pytest

from fantasia_assets.core import exports
from fantasia_assets.core.summary import (
    PARTITION_KEYS,
    TERM_KEYS,
    TOPGO_COLUMNS,
    _best_reliability,
    topgo_tables,
)


def _reference(raw: pl.DataFrame) -> dict:
    keys = [*PARTITION_KEYS, "category"]
    best = _best_reliability(raw, keys).sort([*keys, *TERM_KEYS], nulls_last=True)
    return {
        key: frame.select(TOPGO_COLUMNS)
        for key, frame in best.partition_by(keys, as_dict=True, maintain_order=True).items()
    }


def _rows(rng: random.Random, n: int) -> pl.DataFrame:
    values = [0.5, 0.25, 0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1.0, None]
    return pl.DataFrame(
        {
            "accession": [rng.choice(["A", "B", "b", "A,x", "A\nx", "é", None]) for _ in range(n)],
            "go_id": [rng.choice(["GO:1", "GO:2", "GO:10", None]) for _ in range(n)],
            "model_name": [rng.choice(["M", "N", "m n"]) for _ in range(n)],
            "layer_index": pl.Series([rng.choice([0, 1, None]) for _ in range(n)], dtype=pl.Int64),
            "category": [rng.choice(["P", "F", "C", None]) for _ in range(n)],
            "reliability_index": pl.Series(
                [rng.choice(values) if rng.random() < 0.7 else rng.random() for _ in range(n)],
                dtype=pl.Float64,
            ),
            "distance": [rng.random() for _ in range(n)],
        },
        schema_overrides={"accession": pl.String, "go_id": pl.String, "category": pl.String},
    )


@pytest.mark.parametrize("seed", range(40))
def test_sorted_topgo_tables_equal_the_grouped_ones(seed: int) -> None:
    rng = random.Random(seed)
    raw = _rows(rng, rng.choice([0, 1, 5, 60, 400]))
    ours, expected = topgo_tables(raw), _reference(raw)
    assert list(ours) == list(expected)
    for key, table in expected.items():
        assert ours[key].schema == table.schema
        for precision in (None, 4):  # shortest round trip shows every bit, -0.0 included
            assert exports.csv_bytes(ours[key], precision) == exports.csv_bytes(table, precision)
    assert list(topgo_tables(raw.lazy())) == list(expected)


@pytest.mark.parametrize("order", [[0.0, -0.0], [-0.0, 0.0], [float("nan"), -0.0], [-0.0, float("nan"), 0.0]])
def test_signed_zero_ties_keep_the_grouped_maximum(order: list[float]) -> None:
    n = len(order)
    raw = pl.DataFrame(
        {
            "accession": ["B"] * n + ["A"],
            "go_id": ["GO:1"] * (n + 1),
            "model_name": ["M"] * (n + 1),
            "layer_index": [0] * (n + 1),
            "category": ["P"] * (n + 1),
            "reliability_index": [*order, 0.5],
        }
    )
    ours, expected = topgo_tables(raw), _reference(raw)
    for key, table in expected.items():
        assert exports.csv_bytes(ours[key], None) == exports.csv_bytes(table, None)
    # +0.0 outranks -0.0 (IEEE 754 totalOrder), whichever comes first
    best = ours[("M", 0, "P")].filter(pl.col("accession") == "B")["reliability_index"][0]
    positive_zero = any(v == 0 and math.copysign(1.0, v) > 0 for v in order)
    assert math.copysign(1.0, best) == (1.0 if positive_zero else -1.0)
