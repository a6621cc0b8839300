"""The in-memory summary and ensemble of small runs write DuckDB's bytes exactly.

The same random raw rows as `test_aggregate` (ties, nulls, NaN, exact rounding ties, groups
longer than the unrolled Kahan steps, alignment columns present or absent, hostile model names,
random summary specs) plus infinities, null keys and a partition missing a column: both paths
write summary.csv and the ensemble's files, compared byte for byte, and also with shortest
round-trip floats so that every bit of every value shows.
"""

from __future__ import annotations

import math
import random
import struct
from pathlib import Path

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fantasia_assets.core import aggregate, aggregate_memory, exports
from fantasia_assets.core.aggregate_memory import _kahan_means
from fantasia_assets.core.summary import SummarySpec
from fantasia_assets_tests.core.test_aggregate import _raw, _spec


def _files(frames: list[pl.DataFrame], folder: Path) -> list[Path]:
    files = []
    for i, frame in enumerate(frames):
        files.append(folder / f"part{i}.parquet")
        frame.write_parquet(files[-1])
    return files


def _both(files: list[Path], folder: Path, spec: SummarySpec, limit: int, precision: int | None) -> None:
    with aggregate.parquet_connection({"raw_rows": files}, folder / "spill") as rows:
        names, batches = aggregate.summary_batches(rows, spec, limit)
        frames = list(batches)
        ensemble = aggregate.ensemble_tables(rows)
        if precision is not None:
            aggregate.write_summary(rows, spec, limit, folder / "duckdb.csv", precision)
    expected = pl.concat(frames) if frames else None
    ours_names, ours = aggregate_memory.summary_frame(files, spec, limit)
    assert ours_names == names
    if expected is not None:
        assert ours.schema == expected.schema
        assert exports.csv_bytes(ours, None) == exports.csv_bytes(expected, None)
    else:
        assert ours.height == 0
    if precision is not None:
        aggregate_memory.write_summary(files, spec, limit, folder / "memory.csv", precision)
        assert (folder / "memory.csv").read_bytes() == (folder / "duckdb.csv").read_bytes()
    ours_ensemble = aggregate_memory.ensemble_tables(files)
    assert list(ours_ensemble) == list(ensemble)
    for category, table in ensemble.items():
        assert exports.csv_bytes(ours_ensemble[category], None) == exports.csv_bytes(table, None)


def _hostile(frames: list[pl.DataFrame], rng: random.Random) -> list[pl.DataFrame]:
    """Infinities and -0.0 among the metrics, and a few null accessions and GO ids."""
    out = []
    for frame in frames:
        if frame.height and rng.random() < 0.5:
            at = rng.randrange(frame.height)
            column = rng.choice(["reliability_index", "distance"])
            frame = frame.with_columns(
                pl.when(pl.int_range(pl.len()) == at)
                .then(pl.lit(rng.choice([float("inf"), float("-inf")])))
                .otherwise(pl.col(column))
                .alias(column)
            )
        if frame.height and rng.random() < 0.5:  # -0.0, which a mean of one value turns into 0.0
            column = rng.choice(
                [c for c in ("identity", "identity_sw", "reliability_index") if c in frame.columns]
            )
            at = rng.sample(range(frame.height), min(frame.height, 3))
            frame = frame.with_columns(
                pl.when(pl.int_range(pl.len()).is_in(at))
                .then(pl.lit(-0.0))
                .otherwise(pl.col(column))
                .alias(column)
            )
        if frame.height and rng.random() < 0.3:
            key = rng.choice(["accession", "go_id"])
            frame = frame.with_columns(
                pl.when(pl.int_range(pl.len()) == 0).then(None).otherwise(pl.col(key)).alias(key)
            )
        out.append(frame)
    return out


@pytest.mark.parametrize("seed", range(30))
def test_memory_summary_and_ensemble_equal_duckdb(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    spec = _spec(rng)
    frames = _raw(rng, alignment=rng.random() < 0.7)
    if not any(f.height for f in frames):
        frames[0] = _raw(random.Random(seed + 1000), alignment=True)[0]
    if seed % 3 == 0:
        frames = _hostile(frames, rng)
    _both(_files(frames, tmp_path), tmp_path, spec, rng.randint(1, 7), rng.choice([None, 0, 4, 6]))


def test_partition_without_alignment_and_empty_partition(tmp_path: Path) -> None:
    rng = random.Random(11)
    with_alignment, without = _raw(rng, alignment=True)[0], _raw(rng, alignment=False)[0]
    empty = without.head(0).with_columns(pl.lit("other").alias("model_name"))
    files = _files([with_alignment, without, empty], tmp_path)
    _both(files, tmp_path, SummarySpec.default(), 5, 4)


def test_missing_inputs_and_columns_are_named(tmp_path: Path) -> None:
    with pytest.raises(aggregate.RawRowsError, match=r"gone\.parquet"):
        aggregate_memory.summary_frame([tmp_path / "gone.parquet"], SummarySpec.default(), 5)
    pl.DataFrame({"accession": ["A"], "go_id": ["GO:1"]}).write_parquet(tmp_path / "thin.parquet")
    with pytest.raises(aggregate.RawRowsError, match="model_name"):
        aggregate_memory.summary_frame([tmp_path / "thin.parquet"], SummarySpec.default(), 5)
    with pytest.raises(aggregate.RawRowsError, match="reliability_index"):
        aggregate_memory.ensemble_tables([tmp_path / "thin.parquet"])


def _kahan_mean_oracle(values: list[float]) -> float | None:
    """The straightforward definition: the values in ascending order (NaN last, equal values
    in list order), a Kahan sum from (0, 0) in Python floats, over their count."""
    if not values:
        return None
    total = carry = 0.0
    for value in sorted(values, key=lambda v: (math.isnan(v), 0.0 if math.isnan(v) else v)):
        y = value - carry
        t = total + y
        carry = (t - total) - y
        total = t
    return total / len(values)


_HOSTILE_FLOATS = st.one_of(
    st.sampled_from([0.0, -0.0, math.inf, -math.inf, math.nan, -math.nan, 1e308, -1e308, 5e-324, 1.0 / 3]),
    st.floats(allow_nan=True, allow_infinity=True),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.lists(_HOSTILE_FLOATS, max_size=9), max_size=40))
def test_kahan_means_equal_the_per_group_definition(groups: list[list[float]]) -> None:
    series = pl.Series(groups, dtype=pl.List(pl.Float64))
    got = _kahan_means(series).to_list()
    for value, expected in zip(got, map(_kahan_mean_oracle, groups), strict=True):
        if expected is None:
            assert value is None
        else:
            assert struct.pack("<d", value) == struct.pack("<d", expected) or (
                math.isnan(value) and math.isnan(expected)
            )
