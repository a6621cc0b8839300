"""DuckDB's summary and ensemble equal the polars reference, on random raw rows.

Each case draws several partitions of raw rows (ties, nulls, NaN, exact rounding ties such as
7/32, groups longer than the unrolled Kahan steps, alignment columns present or absent) and a
random summary spec (every aggregation word and every kind of weight key), writes one Parquet
file per partition as the lookup does, and compares the CSV text of both results written with
shortest round-trip floats (equal text is equal bits): every column but the means and the
scores built on them bit for bit, those within 1e-14 relative (see `_mean_dependent`).
"""

from __future__ import annotations

import random
from pathlib import Path

import polars as pl
import pytest

from fantasia_assets.core import aggregate, exports
from fantasia_assets.core.summary import SummarySpec, summarise, topgo_ensemble

MODELS = ["ProtT5", "ESM/2 x|y", "a,b", 'quote"d']
METRICS = {"reliability_index": "ri", "identity": "id_g", "identity_sw": "id_l", "distance": "d"}
ALIGNMENT = ("identity", "identity_sw")
# polars reduces sum_horizontal's columns on its thread pool: in halves (the order the SQL
# uses) for up to 8 columns with two threads or more, for up to 4 with one thread.
MAX_WEIGHTED = 8 if pl.thread_pool_size() >= 2 else 4


def _value(rng: random.Random) -> float | None:
    pick = rng.random()
    if pick < 0.1:
        return None
    if pick < 0.13:
        return float("nan")
    if pick < 0.45:
        return rng.randrange(0, 33) / 32  # exact binary fractions: rounding ties at 4 digits
    return rng.choice([rng.random(), rng.random() * 1e-3, rng.random() * 7])


def _raw(rng: random.Random, alignment: bool) -> list[pl.DataFrame]:
    partitions = rng.sample([(m, layer) for m in MODELS for layer in (0, 1, None)], rng.randint(1, 4))
    frames = []
    for model, layer in partitions:
        n = rng.randint(0, 50)
        keys = [(rng.choice("ABCD"), f"GO:{rng.randint(1, 6)}") for _ in range(n)]
        if rng.random() < 0.4:  # one long group: past the unrolled Kahan steps
            keys += [("A", "GO:1")] * rng.randint(9, 14)
        rng.shuffle(keys)
        rows = {
            "accession": [k[0] for k in keys],
            "model_name": [model] * len(keys),
            "layer_index": [layer] * len(keys),
            "go_id": [k[1] for k in keys],
            "category": [None if rng.random() < 0.1 else rng.choice("PFC") for _ in keys],
            "go_description": [None if rng.random() < 0.2 else f"term {rng.randint(1, 3)}" for _ in keys],
            "protein_id": [None if rng.random() < 0.1 else f"P{rng.randint(1, 6)}" for _ in keys],
            "reliability_index": [_value(rng) for _ in keys],
            "distance": [_value(rng) for _ in keys],
        }
        if alignment:
            rows.update({metric: [_value(rng) for _ in keys] for metric in ALIGNMENT})
        frame = pl.DataFrame(
            rows,
            schema_overrides={"layer_index": pl.Int64, "category": pl.String, "go_description": pl.String}
            | {c: pl.Float64 for c in ("reliability_index", "distance", *ALIGNMENT) if c in rows}
            | {"protein_id": pl.String},
        )
        frames.append(frame.with_columns(pl.col(pl.Float64).fill_nan(float("nan"))))
    return frames


def _spec(rng: random.Random) -> SummarySpec:
    metrics = {
        metric: rng.sample(["min", "max", "mean", "avg", "median"], rng.randint(2, 3))
        for metric in rng.sample([*METRICS, "absent_column"], rng.randint(1, 3))
    }  # at least one word known to each metric ("median" is ignored): final_score stays defined
    aliases = {m: a for m, a in METRICS.items() if m in metrics and rng.random() < 0.7}
    weights: dict = {}
    for metric, aggs in metrics.items():
        alias = aliases.get(metric, metric)
        kind = rng.randrange(5)
        known = [a for a in aggs if a != "median"]
        if kind == 0 and known:  # full output name
            weights[f"{rng.choice(known)}_{alias}"] = rng.choice([0.2, 1, 0.35])
        elif kind == 1:  # metric or alias with a number
            weights[rng.choice([metric, alias])] = rng.choice([0.1, 2, 0.4])
        elif kind == 2 and known:  # {agg: weight}, mean and avg spelt either way
            word = rng.choice(known)
            word = {"mean": "avg", "avg": "mean"}.get(word, word) if rng.random() < 0.3 else word
            weights[rng.choice([metric, alias])] = {word: rng.choice([0.3, 1.5])}
        # kind 3, 4: no weight for this metric
    include_counts = rng.random() < 0.7
    if include_counts or not weights:
        include_counts = True
        weights["count"] = rng.choice([0.2, 1.0])
    return SummarySpec(metrics, aliases, weights, include_counts, rng.choice(["w_", "weighted_"]))


def _duckdb(files: list[Path], folder: Path, spec: SummarySpec, limit: int):
    with aggregate.parquet_connection({"raw_rows": files}, folder / "spill") as rows:
        names, batches = aggregate.summary_batches(rows, spec, limit)
        frames = list(batches)
        ensemble = aggregate.ensemble_tables(rows)
    summary = pl.concat(frames) if frames else pl.DataFrame(schema=dict.fromkeys(names, pl.Float64))
    return summary, ensemble


def _mean_dependent(spec: SummarySpec, names: list[str]) -> list[str]:
    """Columns whose value comes from a mean: the mean, its weighted column and final_score.

    polars' grouped mean adds the values in an order of its engine's choosing (it changes with
    the number of rows and threads: neither row order, nor Kahan in row order, reproduces it
    on 200 rows); DuckDB's adds them in raw-row order with Kahan compensation. Both are within
    a few units in the last place of the exact mean; everything else is equal bit for bit.
    """
    means = [c for c in spec.columns() if c.agg in ("mean", "avg")]
    if not means:
        return []
    stems = {c.name for c in means} | {spec.weighted_prefix + c.name for c in means if c.weight is not None}
    stems |= {"final_score"} if any(c.weight is not None for c in means) else set()
    return [n for n in names if any(n.startswith(stem + "_") for stem in stems)]


def _exact(frame: pl.DataFrame) -> bytes:
    return exports.csv_bytes(frame, precision=None)  # shortest round-trip floats: every bit shows


@pytest.mark.parametrize("seed", range(40))
def test_duckdb_summary_and_ensemble_equal_polars(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    spec = _spec(rng)
    weighted = [c for c in spec.columns() if c.weight is not None]
    if len(weighted) > MAX_WEIGHTED:
        pytest.skip(f"{len(weighted)} weighted columns: polars' own order is not fixed there")
    frames = _raw(rng, alignment=rng.random() < 0.7)
    if not any(f.height for f in frames):
        frames[0] = _raw(random.Random(seed + 1000), alignment=True)[0]
    limit = rng.randint(1, 7)
    files = []
    for i, frame in enumerate(frames):
        files.append(tmp_path / f"part{i}.parquet")
        frame.write_parquet(files[-1])
    raw = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")

    summary, ensemble = _duckdb(files, tmp_path, spec, limit)

    expected = summarise(raw, spec, limit)
    assert summary.columns == expected.columns
    approximate = _mean_dependent(spec, summary.columns)
    assert _exact(summary.drop(approximate)) == _exact(expected.drop(approximate))
    for name in approximate:
        for ours, theirs in zip(summary[name], expected[name], strict=True):
            assert (ours is None) == (theirs is None)
            if ours is not None:
                assert ours == pytest.approx(theirs, rel=1e-14, abs=1e-300, nan_ok=True)
    reference = topgo_ensemble(raw)
    assert list(ensemble) == list(reference)
    for category, table in reference.items():
        assert _exact(ensemble[category]) == _exact(table)


def test_partitions_missing_a_column_read_it_as_null(tmp_path: Path) -> None:
    """A partition written with alignment off beside one with it: the metric is null there."""
    rng = random.Random(7)
    with_alignment, without = _raw(rng, alignment=True)[0], _raw(rng, alignment=False)[0]
    files = [tmp_path / "a.parquet", tmp_path / "b.parquet"]
    with_alignment.write_parquet(files[0])
    without.write_parquet(files[1])
    spec = SummarySpec.default()
    summary, _ = _duckdb(files, tmp_path, spec, 5)
    raw = pl.concat([with_alignment, without], how="diagonal_relaxed")
    assert _exact(summary) == _exact(summarise(raw, spec, 5))


def test_missing_inputs_are_named(tmp_path: Path) -> None:
    gone = aggregate.parquet_connection({"raw_rows": [tmp_path / "gone.parquet"]}, tmp_path / "spill")
    with pytest.raises(aggregate.RawRowsError, match=r"gone\.parquet"), gone:
        pass
    pl.DataFrame({"accession": ["A"], "go_id": ["GO:1"]}).write_parquet(tmp_path / "thin.parquet")
    thin = aggregate.parquet_connection({"raw_rows": [tmp_path / "thin.parquet"]}, tmp_path / "spill")
    with thin as rows, pytest.raises(aggregate.RawRowsError, match="model_name"):
        aggregate.summary_batches(rows, SummarySpec.default(), 5)
    assert not (tmp_path / "spill").exists()  # the spill folder goes with the connection
