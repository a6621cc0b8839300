"""This machine's matrix units: which the CPU has, how fast torch's products run on them here
(start-up probes, once per process), and whether its int8 product sums exactly.

`screen` chooses the screen's arithmetic from them, `knn.SearchEngine` weighs a screen's product
against its candidates' cost with them (`seconds_per_product`).
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

CPU_FLAGS = ("amx_bf16", "avx512_bf16")
_PROBE_SHAPE = (256, 1024, 1024)  # (queries, references, dim): ~0.5 GFLOP, ~10 ms in float32
_PROBE_MIN_SPEEDUP = 1.5  # the 16-bit screen's conversions and wider selection eat a smaller gain
INT8_LEVELS = 127  # |operand| ≤ 127: negation stays in range, and n·127² < 2³¹ for n ≤ INT8_MAX_DIM


@functools.cache
def cpu_has_bf16_units() -> bool:
    """Whether the CPU reports AMX-BF16 or AVX512-BF16 (Linux's /proc/cpuinfo flags)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="ascii", errors="replace")
    except OSError:
        return False
    flags = {flag for line in text.splitlines() if line.startswith("flags") for flag in line.split()}
    return any(flag in flags for flag in CPU_FLAGS)


def bf16_beats_float32() -> bool:
    """Start-up probe, once per process: bfloat16 at least `_PROBE_MIN_SPEEDUP` × float32."""
    float32, bfloat16 = _probed()
    return float32 / bfloat16 >= _PROBE_MIN_SPEEDUP


@functools.cache
def _probed() -> tuple[float, float]:
    return probe_seconds()


def seconds_per_product() -> tuple[float, float]:
    """(float32, bfloat16) seconds of one multiply-add on one thread here, from the start-up
    probe (once per process): what screening a row costs in either (`knn.SearchEngine`'s
    float32 screen of dense neighbourhoods)."""
    float32, bfloat16 = _probed()
    return float32 / math.prod(_PROBE_SHAPE), bfloat16 / math.prod(_PROBE_SHAPE)


def int8_seconds_per_product() -> float:
    """Seconds of one int8 multiply-add on one thread here (`int8_mm`, exact int32 sums), from a
    probe of `_PROBE_SHAPE` like `probe_seconds`'s, once per process."""
    return _int8_probed() / math.prod(_PROBE_SHAPE)


@functools.cache
def _int8_probed() -> float:
    n_queries, n_references, dim = _PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    queries = torch.randint(-127, 128, (n_queries, dim), generator=generator, dtype=torch.int8)
    references = torch.randint(-127, 128, (n_references, dim), generator=generator, dtype=torch.int8)
    out = torch.empty(n_queries, n_references, dtype=torch.int32)
    with single_threaded():
        int8_mm(queries, references, out)  # the first call builds the kernel: not timed
        return _least_thread_time(lambda: int8_mm(queries, references, out))


def probe_speedup() -> float:
    """float32 time / bfloat16 time of the probe's product (`probe_seconds`)."""
    float32, bfloat16 = probe_seconds()
    return float32 / bfloat16


def probe_seconds() -> tuple[float, float]:
    """(float32, bfloat16) seconds of a `_PROBE_SHAPE` product on one thread: the least of three
    each, in the calling thread's CPU time.

    Thread CPU time, not wall time: the probe runs as the search starts, beside threads that
    read the annotations (psycopg holds the interpreter lock for each row) and write files. Wall
    time counted their turns on the lock and on the cores into the products, and a lookup on
    this very machine once chose float32 (2.9x slower) that way. One thread (OpenMP's count is
    per calling thread): the products then run in this thread, where its CPU clock sees them,
    and the engine's workers each run single-thread products too.
    """
    n_queries, n_references, dim = _PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(n_queries, dim, generator=generator)
    references = torch.randn(n_references, dim, generator=generator)
    best = {}
    with single_threaded():
        for dtype in (torch.float32, torch.bfloat16):
            a, b = queries.to(dtype), references.to(dtype)
            torch.mm(a, b.T)  # the first call builds oneDNN's kernel: not timed
            best[dtype] = _least_thread_time(lambda a=a, b=b: torch.mm(a, b.T))
    return best[torch.float32], best[torch.bfloat16]


def _least_thread_time(work: Callable[[], object]) -> float:
    """The least of three runs of `work`, in this thread's CPU time (at least 1 ns)."""
    times = []
    for _ in range(3):
        started = time.thread_time()
        work()
        times.append(time.thread_time() - started)
    return max(min(times), 1e-9)


@contextlib.contextmanager
def single_threaded(threads: int = 1) -> Iterator[None]:
    """Run torch's operations on `threads` threads (process-wide), then restore the count. The
    screen's small operations run on the calling thread: each parallel region waits for every
    thread of the pool, and on a busy machine one descheduled thread stalls it for a scheduler
    slice, far longer than the work (measured: a 0.6 ms reduction took 50-80 ms on two threads
    while other processes held the cores). Only the products get the pool."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@functools.cache
def int8_sums_exactly() -> bool:
    """Whether torch's int8 product returns exact int32 sums here, checked once per process on
    the extremes ±127 (a kernel that saturated 16-bit partial sums, as some int8 paths of
    CPUs without VNNI do, would fail it): the bound assumes exact sums."""
    generator = torch.Generator().manual_seed(0)
    signs = torch.randint(0, 2, (48, 2 * 1024 + 3), generator=generator) * 2 - 1
    rows = (signs * INT8_LEVELS).to(torch.int8)
    rows[1] = -rows[0]
    exact = rows.long() @ rows.long().T
    product = int8_mm(rows[:16], rows, torch.empty(16, len(rows), dtype=torch.int32))
    return torch.equal(product.long(), exact[:16])


def int8_mm(queries: torch.Tensor, references: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """queries @ referencesᵀ of int8 rows, exactly, into `out` (int32). torch 2.13's CPU int8
    kernel returns garbage for one-dimensional rows (measured: every dimension from 2 to 1,024
    is exact), so those take int64 products, exact too."""
    if queries.shape[1] > 1:
        return torch._int_mm(queries, references.T, out=out)
    return out.copy_(queries.long() @ references.long().T)
