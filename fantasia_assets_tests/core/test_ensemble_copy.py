"""The TopGO ensemble of a single partition copied from the partition's own TopGO files
(`writers.write_ensemble(topgo_written=True)`) equals the ensemble computed from its raw rows,
byte for byte, on the random rows of `test_aggregate` (ties, ±0, infinities, null categories and
indices; NaN and null keys, where the copy must step aside)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import polars as pl
import pytest

from fantasia_assets.core import writers
from fantasia_assets.core.layout import ENSEMBLE
from fantasia_assets.core.plan import ModelSpec, Partition
from fantasia_assets_tests.core.test_aggregate import _raw
from fantasia_assets_tests.core.test_aggregate_memory import _hostile


def _ensemble(root: Path, partition: Partition, raw: pl.DataFrame, precision: int, copy: bool) -> dict:
    writers.write_raw_rows(root, partition, raw)
    writers.write_partition_topgo(root, partition, raw, precision)
    writers.write_ensemble(root, [partition], precision, root / "spill", topgo_written=copy)
    return {path.name: path.read_bytes() for path in sorted((root / ENSEMBLE).iterdir())}


@pytest.mark.parametrize("seed", range(40))
def test_single_partition_ensemble_copy_equals_computed(seed: int, tmp_path: Path) -> None:
    rng = random.Random(seed)
    raw = _raw(rng, alignment=False)[0]
    if rng.random() < 0.3:
        raw = _hostile([raw], rng)[0]
    elif rng.random() < 0.7:  # no NaN: the copy is taken
        raw = raw.with_columns(pl.col("reliability_index").fill_nan(0.5))
    model, layer = raw["model_name"][0] if raw.height else "M", raw["layer_index"][0] if raw.height else 0
    partition = Partition(ModelSpec(model or "M"), 1, layer)
    precision = rng.choice([0, 2, 4, 6, 16])
    copied = _ensemble(tmp_path / "copied", partition, raw, precision, copy=True)
    computed = _ensemble(tmp_path / "computed", partition, raw, precision, copy=False)
    assert copied == computed


def test_copy_taken_only_for_plain_terms(tmp_path: Path) -> None:
    raw = _raw(random.Random(3), alignment=False)[0].with_columns(pl.col("reliability_index").fill_nan(0.5))
    raw = raw.filter(pl.col("accession").is_not_null() & pl.col("go_id").is_not_null())
    partition = Partition(ModelSpec("M"), 1, 0)
    writers.write_raw_rows(tmp_path, partition, raw)
    file = writers.raw_row_files(tmp_path, [partition])[0]
    assert writers._plain_terms(file)
    for broken in (
        raw.with_columns(pl.lit(float("nan")).alias("reliability_index")),
        raw.with_columns(pl.lit(None, dtype=pl.String).alias("go_id")),
    ):
        shutil.rmtree(tmp_path / "parquet")
        writers.write_raw_rows(tmp_path, partition, broken)
        assert not writers._plain_terms(file)
