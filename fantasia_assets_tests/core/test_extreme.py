"""`summary.extreme` and its SQL twin `aggregate._extreme`: a group's min and max are the same
bits whatever order its rows come in, on polars and on DuckDB, signed zeros and NaN included."""

from __future__ import annotations

import itertools
import math
import struct

import duckdb
import polars as pl
import pytest

from fantasia_assets.core.aggregate import _extreme
from fantasia_assets.core.summary import extreme

NAN, INF = float("nan"), float("inf")
GROUPS = [
    [0.0, -0.0],
    [-0.0, NAN, 0.0],
    [-0.0, -0.0, NAN],
    [0.0, 0.0, NAN],
    [NAN, NAN],
    [-0.0, -INF, -1.0],
    [0.0, 5e-324, -0.0],
    [-5e-324, -0.0, 0.0],
    [INF, 0.0, -0.0, NAN],
    [0.25, 0.25, -0.0],
]


def _bits(value: float | None) -> bytes | None:
    return None if value is None else struct.pack("<d", value)


def _total_order(values: list[float], which: str) -> float:
    """The expected answer, from first principles: NaN only when every value is NaN, then the
    last (max) or first (min) value in IEEE 754 totalOrder, where −0.0 sorts before +0.0."""
    numbers = [v for v in values if not math.isnan(v)]
    if not numbers:
        return NAN
    ordered = sorted(numbers, key=lambda v: (v, math.copysign(1.0, v)))
    return ordered[-1] if which == "max" else ordered[0]


@pytest.mark.parametrize("which", ["min", "max"])
@pytest.mark.parametrize("group", GROUPS, ids=lambda g: ",".join(map(repr, g)))
def test_every_order_gives_the_total_order_extreme(group: list[float], which: str) -> None:
    expected = _bits(_total_order(group, which))
    connection = duckdb.connect()
    for order in set(itertools.permutations(range(len(group)))):
        values = [group[i] for i in order]
        # two groups, one of them split by a foreign row, so grouping meets the values apart
        frame = pl.DataFrame(
            {"g": [1, 2, *[1] * (len(values) - 1)], "v": [values[0], 7.0, *values[1:]]},
            schema={"g": pl.Int64, "v": pl.Float64},
        )
        got = frame.group_by("g", maintain_order=True).agg(extreme(pl.col("v"), which))
        assert _bits(got["v"][0]) == expected, (order, which)
        whole = frame.filter(pl.col("g") == 1).select(extreme(pl.col("v"), which))
        assert _bits(whole["v"][0]) == expected, (order, which)
        sql = connection.sql(
            f"SELECT g, {_extreme('v', which)} AS v FROM frame GROUP BY g ORDER BY g"
        ).fetchall()
        assert _bits(sql[0][1]) == expected, (order, which)


def test_nulls_are_skipped_and_an_all_null_group_gives_null() -> None:
    frame = pl.DataFrame({"g": [1, 1, 2], "v": [None, -0.0, None]}, schema={"g": pl.Int64, "v": pl.Float64})
    got = frame.group_by("g", maintain_order=True).agg(extreme(pl.col("v"), "max"))
    assert _bits(got["v"][0]) == _bits(-0.0) and got["v"][1] is None
    rows = (
        duckdb.connect().sql(f"SELECT g, {_extreme('v', 'max')} FROM frame GROUP BY g ORDER BY g").fetchall()
    )
    assert _bits(rows[0][1]) == _bits(-0.0) and rows[1][1] is None
