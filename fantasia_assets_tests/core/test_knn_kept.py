"""Kept screening operands (`core/knn_reference.py`): an engine built from kept files holds the
very operands, scales, norms, centre and maxima a fresh build prepares, answers every search
identically, and a kept file that is not this preparation's (damaged, another tag, cut short)
is prepared afresh and written again."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fantasia_assets.core import knn_reference, screen
from fantasia_assets.core.knn import SearchEngine
from fantasia_assets_tests.core.test_knn_screen import exact_oracle

UNITS = screen.cpu_has_bf16_units()  # before the fixture below pretends every CPU has them


@pytest.fixture(autouse=True)
def bf16_units(monkeypatch):
    """The 16-bit screen on any CPU (torch multiplies bfloat16 everywhere, only slowly without
    matrix units): these tests compare a restored engine with a fresh one, not speeds."""
    monkeypatch.setattr(screen, "cpu_has_bf16_units", lambda: True)


def _mapped(tmp_path, seed=0, rows=3000, dim=96):
    """A read-only float16 memory map, as the reference cache hands it over, with the rows that
    stress the preparation: a zero row, a duplicated row, tiny and huge components."""
    rng = np.random.default_rng(seed)
    matrix = rng.standard_normal((rows, dim)).astype(np.float16)
    matrix[5] = 0
    matrix[6] = matrix[7]
    matrix[8] *= np.float16(1e-3)
    matrix[9, :4] = np.float16(60000)
    matrix[10, :] = np.float16(6e-8)  # float16's smallest subnormal
    path = tmp_path / "matrix.npy"
    np.save(path, matrix)
    return np.load(path, mmap_mode="r"), rng.standard_normal((200, dim)).astype(np.float32)


def _same_preparation(a: knn_reference.PreparedReferences, b: knn_reference.PreparedReferences) -> None:
    assert torch.equal(a.operands.view(torch.int16), b.operands.view(torch.int16))
    assert a.stats == b.stats
    for name in ("_scale_host",):
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None and y is None) or np.array_equal(x.view(np.uint32), y.view(np.uint32))
    for x, y in ((a.sq_norms, b.sq_norms), (a.centre, b.centre)):
        assert (x is None and y is None) or torch.equal(x.view(torch.int32), y.view(torch.int32))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_restored_engine_equals_a_fresh_build_and_reads_no_row_beyond_its_sample(
    tmp_path, monkeypatch, metric
):
    matrix, queries = _mapped(tmp_path)
    kept = tmp_path / "matrix.operands"
    fresh = SearchEngine(metric, "torch", "cpu", screening="bf16").build(matrix)
    first = SearchEngine(metric, "torch", "cpu", screening="bf16").build(matrix, kept=kept)
    assert not first._references.restored
    knn_reference.wait_until_kept()  # written beside the search, on a thread of their own
    names = sorted(path.name for path in tmp_path.glob("matrix.operands.*"))
    assert names == [f"matrix.operands.{metric}-bf16{suffix}" for suffix in (".json", ".npy", ".rows.npy")]

    measured = []
    real = knn_reference.row_sq_norms
    monkeypatch.setattr(
        knn_reference, "row_sq_norms", lambda rows, *a, **k: measured.append(len(rows)) or real(rows, *a, **k)
    )
    restored = SearchEngine(metric, "torch", "cpu", screening="bf16").build(matrix, kept=kept)
    assert restored._references.restored
    assert 0 < len(measured) <= knn_reference._KEPT_SAMPLE and set(measured) == {1}  # the sample only
    _same_preparation(fresh._references, restored._references)
    for threshold, ties in ((None, False), (0.9, True)):
        expected = fresh.search(queries, 5, threshold=threshold, tie_expansion=ties)
        got = restored.search(queries, 5, threshold=threshold, tie_expansion=ties)
        assert all(np.array_equal(x, y) for x, y in zip(expected, got, strict=True))
    if UNITS:  # where the 16-bit kernel is the one the bound is proven for: the answer itself
        expected = exact_oracle(queries, np.asarray(matrix), metric, 5, 0.9, True)
        assert all(np.array_equal(x, y) for x, y in zip(expected, got, strict=True))


@pytest.mark.skipif(not screen.int8_sums_exactly(), reason="this CPU's int8 product does not sum exactly")
def test_int8_operands_and_factors_are_kept_and_restored_bit_for_bit(tmp_path):
    """The int8 screen keeps its int8 rows and the factor they share (second column of
    .rows.npy, every row); a restored engine holds the very same and answers as the oracle; a
    damaged factor is caught (the factors differ, and the sample check) and prepared afresh."""
    matrix, queries = _mapped(tmp_path)
    kept = tmp_path / "matrix.operands"
    fresh = SearchEngine("cosine", "torch", "cpu", screening="int8").build(matrix, kept=kept)
    knn_reference.wait_until_kept()
    restored = SearchEngine("cosine", "torch", "cpu", screening="int8").build(matrix, kept=kept)
    assert restored._references.restored and restored._references.operands.dtype == torch.int8
    assert torch.equal(fresh._references.operands, restored._references.operands)
    assert torch.equal(
        fresh._references.operand_scale.view(torch.int32),
        restored._references.operand_scale.view(torch.int32),
    )
    assert fresh._references.stats == restored._references.stats
    expected = exact_oracle(queries, np.asarray(matrix), "cosine", 5, 0.9, True)
    got = restored.search(queries, 5, threshold=0.9, tie_expansion=True)
    assert all(np.array_equal(x, y) for x, y in zip(expected, got, strict=True))
    rows_file = kept.with_name(f"{kept.name}.cosine-int8.rows.npy")
    rows = np.load(rows_file)
    rows[0, 1] = np.nextafter(rows[0, 1], np.float32(1))  # row 0 is in the sample
    np.save(rows_file, rows)
    again = SearchEngine("cosine", "torch", "cpu", screening="int8").build(matrix, kept=kept)
    assert not again._references.restored
    assert torch.equal(again._references.operand_scale, fresh._references.operand_scale)


def _damage_operand_bit(kept, metric, row):
    bits = np.load(kept.with_name(f"{kept.name}.{metric}-bf16.npy"), mmap_mode="r+")
    bits[row, 0] ^= 1
    bits.flush()


@pytest.mark.parametrize(
    "damage",
    ["operand bit", "scale", "tag", "description", "rows cut", "operands cut", "no description"],
)
def test_a_kept_file_that_is_not_this_preparation_is_prepared_again(tmp_path, damage):
    matrix, queries = _mapped(tmp_path, seed=1)
    kept = tmp_path / "matrix.operands"
    fresh = SearchEngine("cosine", "torch", "cpu", screening="bf16").build(matrix, kept=kept)
    knn_reference.wait_until_kept()
    stem = kept.with_name(f"{kept.name}.cosine-bf16")
    operands, rows, description = (stem.with_name(stem.name + s) for s in (".npy", ".rows.npy", ".json"))
    if damage == "operand bit":  # a sampled row: the sample spans the first and last rows
        _damage_operand_bit(kept, "cosine", len(matrix) - 1)
    elif damage == "scale":
        table = np.load(rows)
        table[0, 0] = np.nextafter(table[0, 0], np.float32(2))
        np.save(rows, table)
    elif damage == "tag":
        text = json.loads(description.read_text())
        assert "|cosine|" in text["tag"]
        text["tag"] = text["tag"].replace("|cosine|", "|euclidean|")
        description.write_text(json.dumps(text))
    elif damage == "description":
        description.write_text("{not json")
    elif damage == "rows cut":
        np.save(rows, np.load(rows)[:-1])
    elif damage == "operands cut":
        np.save(operands, np.load(operands)[:-1])
    else:
        description.unlink()
    again = SearchEngine("cosine", "torch", "cpu", screening="bf16").build(matrix, kept=kept)
    assert not again._references.restored
    _same_preparation(fresh._references, again._references)
    expected, got = fresh.search(queries, 5), again.search(queries, 5)
    assert all(np.array_equal(x, y) for x, y in zip(expected, got, strict=True))
    third = SearchEngine("cosine", "torch", "cpu", screening="bf16").build(matrix, kept=kept)
    assert third._references.restored  # written again, whole
    _same_preparation(fresh._references, third._references)


def test_kept_files_are_per_metric_and_arithmetic_and_the_float32_screen_keeps_none(tmp_path):
    matrix, _ = _mapped(tmp_path, seed=2, rows=600)
    kept = tmp_path / "matrix.operands"
    SearchEngine("cosine", "torch", "cpu", screening="fp32").build(matrix, kept=kept)
    assert not list(tmp_path.glob("matrix.operands.*"))
    SearchEngine("cosine", "torch", "cpu", screening="bf16").build(matrix, kept=kept)
    knn_reference.wait_until_kept()
    euclidean = SearchEngine("euclidean", "torch", "cpu", screening="bf16").build(matrix, kept=kept)
    assert not euclidean._references.restored  # the cosine files are not the euclidean ones
    knn_reference.wait_until_kept()
    assert len(list(tmp_path.glob("matrix.operands.*.json"))) == 2


def test_an_unwritable_kept_place_only_costs_the_next_build(tmp_path, caplog):
    matrix, queries = _mapped(tmp_path, seed=3, rows=600)
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    engine = SearchEngine("cosine", "torch", "cpu", screening="bf16").build(
        matrix, kept=blocked / "m.operands"
    )
    knn_reference.wait_until_kept()  # written (or not) on a thread of its own
    assert "not kept" in caplog.text
    fresh = SearchEngine("cosine", "torch", "cpu", screening="bf16").build(matrix)
    assert all(
        np.array_equal(x, y) for x, y in zip(fresh.search(queries, 3), engine.search(queries, 3), strict=True)
    )


def test_dask_workers_keep_and_read_operands_beside_the_shared_cache_file(tmp_path):
    """A worker's engine (`core.distributed`) keeps its operands where the driver says, and a
    later worker reads them."""
    from fantasia_assets.core import distributed

    matrix, queries = _mapped(tmp_path, seed=4, rows=800)
    where = distributed.MatrixFile(
        str(tmp_path / "matrix.npy"), "f", len(matrix), matrix.shape[1], str(tmp_path / "matrix.operands")
    )
    settings = distributed.BlockSettings("cosine", "torch", False, 5, None, False, 50, None, "bf16")
    try:
        first, _ = distributed._worker_engine(where, settings)
        knn_reference.wait_until_kept()
        distributed._engines.clear()  # another worker, or this one on a later run
        later, _ = distributed._worker_engine(where, settings)
    finally:
        distributed._engines.clear()
    assert not first._references.restored and later._references.restored
    expected, got = first.search(queries, 5), later.search(queries, 5)
    assert all(np.array_equal(x, y) for x, y in zip(expected, got, strict=True))


def test_other_preparing_code_prepares_afresh(tmp_path, monkeypatch):
    """The tag names a digest of the preparing code and libraries: files kept by another
    version of them are not read, even where the sample would agree."""
    matrix, _ = _mapped(tmp_path, seed=5, rows=500)
    kept = tmp_path / "matrix.operands"
    SearchEngine("cosine", "torch", "cpu", screening="bf16").build(matrix, kept=kept)
    knn_reference.wait_until_kept()
    monkeypatch.setattr(knn_reference, "_preparation_code", lambda: "another version")
    again = SearchEngine("cosine", "torch", "cpu", screening="bf16").build(matrix, kept=kept)
    assert not again._references.restored
