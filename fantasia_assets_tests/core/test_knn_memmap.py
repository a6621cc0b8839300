"""The engine on a memory-mapped float16 reference matrix (the reference cache of a million rows):
the same answer as the in-memory array, bit for bit, memory bounded well below a float32 copy,
and a warm search of the same matrix that does not build its engine again."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fantasia_assets.core import knn_inputs, knn_reference, resident, screen
from fantasia_assets.core.knn import METRICS, SearchEngine
from fantasia_assets.core.plan import ModelSpec, Partition
from fantasia_assets.core.references import ReferenceMatrix, ReferenceScope
from fantasia_assets.core.stages import SearchSettings, in_process_search
from fantasia_assets_tests.conftest import shared_file
from fantasia_assets_tests.core.test_knn import read_embeddings
from fantasia_assets_tests.core.test_knn_screen import engines, exact_oracle

# the CPU's bfloat16 screen (`screen.resolve_screening`), built here on any CPU
BF16 = screen.Arithmetic("bf16", torch.bfloat16, 2.0**-22, 2.0**-8, 2.0**-126)


def memmapped(tmp_path, matrix: np.ndarray) -> np.memmap:
    """`matrix` written to a .npy file and opened read-only, as the reference cache opens it."""
    path = tmp_path / "vectors.npy"
    np.save(path, matrix)
    mapped = np.load(path, mmap_mode="r")
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    return mapped


@pytest.mark.parametrize("metric", METRICS)
def test_memmapped_float16_references_give_the_in_memory_answer(tmp_path, metric):
    queries = read_embeddings(shared_file("queries_mouse.h5"), 120)
    references = read_embeddings(shared_file("reference_human.h5"), 1500).astype(np.float16)
    references[7] = 0  # a zero row: its scale is 0 in both forms
    references[11] = references[12]  # a duplicate: ties resolved by index in both forms
    mapped = memmapped(tmp_path, references)
    expected = exact_oracle(queries, references, metric, 5)
    # query i excludes references 0 .. i % 3 (CSR)
    indptr = np.concatenate(([0], np.cumsum(np.arange(120) % 3 + 1)))
    excluded = np.concatenate([np.arange(i % 3 + 1) for i in range(120)])
    for backend, device, screening in engines(metric):
        for budget in (None, 1 << 20):  # one block, and many streamed blocks
            options = {"memory_budget_bytes": budget, "screening": screening}
            in_memory = SearchEngine(metric, backend, device, **options).build(references)
            on_disk = SearchEngine(metric, backend, device, **options).build(mapped)
            label = f"{backend} {device} {on_disk.screening} budget {budget}"
            for arguments in ({}, {"exclude": (indptr, excluded), "tie_expansion": True}):
                got = on_disk.search(queries, 5, **arguments)
                want = in_memory.search(queries, 5, **arguments)
                np.testing.assert_array_equal(got[1], want[1], err_msg=label)
                np.testing.assert_array_equal(got[0], want[0], err_msg=label)
            plain = on_disk.search(queries, 5)
            np.testing.assert_array_equal(plain[1], expected[1], err_msg=label)
            np.testing.assert_array_equal(plain[0], expected[0], err_msg=label)


_MEASURE = """
import json, sys, threading
import numpy as np
from fantasia_assets.core.knn import SearchEngine

def anonymous_rss():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("RssAnon:"))

path, metric, screening, budget = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
mapped = np.load(path, mmap_mode="r")
queries = np.asarray(mapped[:64], dtype=np.float32) + 0.01
engine = SearchEngine(metric, "torch", "cpu", memory_budget_bytes=budget, screening=screening)
SearchEngine(metric, "torch", "cpu", screening=screening).build(mapped[:64]).search(queries, 5)  # warm
baseline, peak, stop = anonymous_rss(), [0], threading.Event()
def sample():
    while not stop.wait(0.001):
        peak[0] = max(peak[0], anonymous_rss())
thread = threading.Thread(target=sample)
thread.start()
engine.build(mapped).search(queries, 5)
stop.set()
thread.join()
peak[0] = max(peak[0], anonymous_rss())
print(json.dumps({"growth": peak[0] - baseline, "screening": engine.screening}))
"""


@pytest.mark.parametrize("screening", ["fp32", "auto"])
def test_search_over_a_memmap_never_holds_it_in_float32(tmp_path, screening):
    """100,000 × 256 float16 rows (51 MB; 102 MB in float32), searched in a fresh process with a
    16 MiB block budget: the anonymous (not file-backed) memory grows by the budget plus less
    than a float32 copy: the float32 screen streams (under a quarter of a float32 copy), a
    16-bit screen holds one 16-bit copy of the operands (half of it) with the build's chunk
    temporaries and per-row statistics (under a quarter more), and no second 16-bit copy. glibc's malloc is told to map every
    block over 128 KiB on its own, so that freed chunk temporaries leave the resident set and
    the growth is the memory actually live at the peak."""
    rng = np.random.default_rng(0)
    matrix = rng.standard_normal((100_000, 256), dtype=np.float32).astype(np.float16)
    path = tmp_path / "vectors.npy"
    np.save(path, matrix)
    float32_bytes, budget = matrix.size * 4, 16 << 20
    del matrix
    result = subprocess.run(
        [sys.executable, "-c", _MEASURE, str(path), "cosine", screening, str(budget)],
        capture_output=True, text=True, check=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"},
    )  # fmt: skip
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    held = 0.25 if measured["screening"] == "fp32" else 0.75
    assert measured["growth"] < held * float32_bytes + budget, measured


# the child scripts' measure: resident bytes of its mappings of the file argv[1] (smaps), not the
# pages of shared libraries that a first call faults in
_MAPPED = """
import os, re, sys

def mapped(path=os.path.realpath(sys.argv[1])):
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):
                inside = line.rstrip().endswith(path)
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total
"""

_RESIDENT = (
    _MAPPED
    + """
import json
import numpy as np
from fantasia_assets.core.knn import SearchEngine

rows = np.load(sys.argv[1], mmap_mode="r")
queries = np.asarray(rows[:64], dtype=np.float32) + 0.01
engine = SearchEngine("cosine", "torch", "cpu", screening="bf16").build(rows)
built = mapped()
found = engine.search(queries, 1)
print(json.dumps({"built": built, "searched": mapped(),
                  "first": found[1][:, 0].tolist()}))
"""
)


def test_a_16bit_screen_leaves_no_memmapped_rows_resident(tmp_path):
    """The build reads every row of a memmapped source twice (norms, then the 16-bit operands);
    each pass unmaps its pages as it goes (`knn_inputs.release_rows`), so the file-backed
    resident set ends far below the file's size (it would be all of it otherwise), and the search
    that follows (k = 1: each query's own row is its one candidate, which refinement reads back)
    finds each query's own row."""
    rng = np.random.default_rng(1)
    matrix = rng.standard_normal((100_000, 256), dtype=np.float32).astype(np.float16)
    path = tmp_path / "vectors.npy"
    np.save(path, matrix)
    file_bytes = matrix.nbytes
    del matrix
    result = subprocess.run(
        [sys.executable, "-c", _RESIDENT, str(path)], capture_output=True, text=True, check=True
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["built"] < 0.1 * file_bytes, measured
    assert measured["searched"] < 0.1 * file_bytes, measured
    assert measured["first"] == list(range(64))


def test_release_rows_leaves_arrays_it_cannot_release_alone(tmp_path):
    """In-memory arrays and copy-on-write maps are not touched: their values stay as they are."""
    from fantasia_assets.core.resident import release_rows

    values = np.arange(4096 * 8, dtype=np.float16).reshape(4096, 8)
    path = tmp_path / "rows.npy"
    np.save(path, values)
    private = np.load(path, mmap_mode="c")
    private[10] = 7  # a change only this map's pages carry
    for array in (values.copy(), private):
        expected = np.array(array)
        release_rows(array, 0, len(array))
        np.testing.assert_array_equal(array, expected)
    shared = np.load(path, mmap_mode="r")
    release_rows(shared, 0, len(shared))
    np.testing.assert_array_equal(shared, values)  # read back from the file, the same bytes


_DIGESTED = (
    _MAPPED
    + """
import json
import numpy as np
from fantasia_assets.core.row_digests import carried_digests, row_digests
import polars as pl

rows = np.load(sys.argv[1], mmap_mode="r")
digests = row_digests(rows, block=1000)
after_digests = mapped()
ids = np.arange(len(rows), dtype=np.int64)
stored = pl.DataFrame({"sequence_id": ids, "digest": digests})
carried = carried_digests(stored, ids, rows, ids, np.load(sys.argv[1], mmap_mode="r"), block=1000)
print(json.dumps({"digests": after_digests, "carried": mapped(),
                  "equal": digests == row_digests(np.array(rows)) and carried == digests}))
"""
)


def test_digesting_a_memmap_leaves_its_rows_unmapped(tmp_path):
    """The incremental state digests every reference row (and compares a previous cache's rows
    with the current ones): block by block, each block unmapped once read, with the digests of
    the in-memory rows."""
    matrix = np.random.default_rng(2).standard_normal((100_000, 256), dtype=np.float32).astype(np.float16)
    path = tmp_path / "vectors.npy"
    np.save(path, matrix)
    result = subprocess.run(
        [sys.executable, "-c", _DIGESTED, str(path)], capture_output=True, text=True, check=True
    )
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["equal"], measured
    assert measured["digests"] < 0.1 * matrix.nbytes, measured
    assert measured["carried"] < 0.1 * matrix.nbytes, measured


def test_a_second_search_of_the_same_matrix_reuses_its_engine(monkeypatch, tmp_path):
    """The in-process search keeps its engine for the next search of the same matrix object and
    settings (a warm lookup skips the build) with the same answer; another matrix, or other
    settings, get an engine of their own."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((400, 32), dtype=np.float32).astype(np.float16)
    queries = rng.standard_normal((30, 32), dtype=np.float32)
    matrix = ReferenceMatrix(ReferenceScope(1, 0), np.arange(400), memmapped(tmp_path, vectors), "f")
    partition = Partition(ModelSpec("M"), 1, 0)
    builds = []
    original = SearchEngine.build
    monkeypatch.setattr(
        SearchEngine, "build", lambda self, m, kept=None: builds.append(m) or original(self, m, kept)
    )

    def run(matrix, settings):
        return [found for _, found in in_process_search(matrix, settings, partition)(queries, None, 7)]

    fp32, auto = SearchSettings(screening="fp32"), SearchSettings()
    first, second = run(matrix, fp32), run(matrix, fp32)
    assert len(builds) == 1
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
    run(matrix, auto)
    other = ReferenceMatrix(ReferenceScope(1, 0), np.arange(400), vectors.copy(), "f")  # same fingerprint
    run(other, auto)
    assert len(builds) == 3
    fresh = SearchEngine("cosine", "torch", "cpu", screening="fp32")
    np.testing.assert_array_equal(original(fresh, vectors).search(queries[:7], 5)[1], first[0][1])


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("arithmetic", [screen.FP32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_prepared_references_do_not_depend_on_chunks_or_workers(
    monkeypatch, tmp_path, metric, arithmetic, dtype
):
    """The build's chunked passes on worker threads (`knn_inputs.in_parallel`) prepare, bit for
    bit, what one pass over the whole matrix on one thread prepares: every value is row-local."""
    rng = np.random.default_rng(3)
    matrix = (rng.standard_normal((1000, 48)) * rng.uniform(1e-3, 1e3, (1000, 1))).astype(dtype)
    matrix[5] = 0  # zero row
    matrix[9] = matrix[10]  # duplicate
    matrix[13, ::2] = np.finfo(dtype).tiny  # tiny components: zeroed operands
    device, previous = torch.device("cpu"), torch.get_num_threads()

    def prepared(source: np.ndarray, rows: int, threads: int) -> knn_reference.PreparedReferences:
        monkeypatch.setattr(knn_reference, "_PREPARE_ROWS", {"cpu": rows})
        monkeypatch.setattr(knn_inputs, "_NORM_ROWS_PER_CHUNK", rows)
        torch.set_num_threads(threads)
        try:
            return knn_reference.PreparedReferences(source, metric, arithmetic, device)
        finally:
            torch.set_num_threads(previous)

    whole = prepared(matrix, len(matrix), 1)
    for source, rows, threads in [(matrix, 7, 2), (matrix, 64, 3), (memmapped(tmp_path, matrix), 7, 2)]:
        chunked = prepared(source, rows, threads)
        assert chunked.stats == whole.stats
        n = len(matrix)  # a memmap's float32 screen makes its operands per block: compare those
        assert_bits_equal(chunked.operand_block(0, n), whole.operand_block(0, n), "operands")
        for name in ("sq_norms", "centre", "_scale_host"):
            got, want = getattr(chunked, name), getattr(whole, name)
            assert (got is None) == (want is None), name
            if want is not None:
                assert_bits_equal(got, want, name)


def assert_bits_equal(got, want, name: str) -> None:
    got, want = (torch.as_tensor(value).float().numpy() for value in (got, want))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name


def test_a_memmap_copied_to_the_card_keeps_its_bits(tmp_path, monkeypatch):
    """`resident.onto_card` (here onto the CPU device): every row's bits, copied a few rows a step."""
    monkeypatch.setattr(resident, "_CARD_ROWS", 7)
    rows = np.random.default_rng(3).standard_normal((50, 24)).astype(np.float16)
    rows[5] = np.float16(6.1e-5)  # subnormal-adjacent values travel unchanged
    held = resident.onto_card(memmapped(tmp_path, rows), torch.device("cpu"))
    assert (
        held.dtype == torch.float16 and held.numpy().view(np.uint16).tolist() == rows.view(np.uint16).tolist()
    )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA card: bench/gpu_check.sh runs this")
@pytest.mark.parametrize("metric", METRICS)
def test_a_memmap_held_on_the_card_or_streamed_gives_the_in_memory_answer(tmp_path, monkeypatch, metric):
    queries = read_embeddings(shared_file("queries_mouse.h5"), 120)
    references = read_embeddings(shared_file("reference_human.h5"), 1500).astype(np.float16)
    mapped = memmapped(tmp_path, references)
    want = SearchEngine(metric, "torch", "cuda").build(references).search(queries, 5)
    held = SearchEngine(metric, "torch", "cuda").build(mapped)
    assert held._references._on_device is not None
    monkeypatch.setattr(knn_reference, "_CARD_SHARE", 0.0)
    streamed = SearchEngine(metric, "torch", "cuda").build(mapped)
    assert streamed._references._on_device is None
    for engine in (held, streamed):
        got = engine.search(queries, 5)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
