"""Benchmark of the exact k-NN engine on the CPU, run by hand (not by CI).

Compares, on synthetic float32 data with a fixed seed and in one run:

* the engine (`fantasia_assets.core.knn.SearchEngine`): torch with the 16-bit screen (where
  this CPU has one) and with the float32 screen, and numpy;
* bare matmuls of the same shape, float32 and bfloat16 (torch.mm of all queries against
  reference blocks): just the FLOPs, the physical limit of any exact search here;
* scipy cdist + argsort, the original CPU path, timed on a slice of the queries and scaled
  linearly to the full size;

the engine's peak resident memory beyond one copy of the reference matrix (with ``--memmap`` the
references are float16 rows in a read-only memory-mapped ``.npy``, as the reference cache hands
them over, and the figure is the whole growth, mapped file pages included), and a check that
the neighbours of 64 queries equal a float64 brute force's. Data: references are noisy members
of 2,000 families and queries perturbed references (as ``../shared/tools/synth_scale.py``), so
neighbourhoods look like real ones; ``--data uniform`` draws plain Gaussian rows, the screen's
worst case (every distance near 1). The last lines are machine-readable ``name=value`` ratios;
target: ``search_over_bare_bf16 <= 1.5``::

    .venv/bin/python bench/search.py                       # 2,000 × 100,000 × 1,024, k=5, cosine
    .venv/bin/python bench/search.py --references 20000    # a quicker look
    .venv/bin/python bench/search.py --memmap               # float16 references from disk
    .venv/bin/python bench/search.py --engines torch-auto   # only the headline engine: quicker
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable

import numpy as np
import psutil
import torch
from scipy.spatial.distance import cdist

from fantasia_assets.core.knn import METRICS, SearchEngine
from fantasia_assets.core.units import int8_mm

GIB = 2**30
_BARE_BLOCK_ROWS = 16384


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's layout in --help and shows each option's default."""


class PeakRss:
    """Highest resident set size of this process while the context is open.

    On Linux the kernel keeps it: the high-water mark (VmHWM of /proc/self/status) is reset on
    entry (writing 5 to /proc/self/clear_refs) and read on exit, exactly and at no cost.
    Elsewhere a thread samples the RSS every 2 ms (tracemalloc cannot see torch's or BLAS's
    allocations); that sampler took ≈ 0.5 CPU-s and ≈ 0.3 s of wall from a 9.5 s lookup on
    two cores (4 alternated runs each), so it is only the fallback."""

    def __enter__(self) -> PeakRss:
        self._process = psutil.Process()
        self._thread = None
        self.peak = self._process.memory_info().rss
        if _reset_high_water_mark():
            return self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc_info: object) -> None:
        if self._thread is None:
            self.peak = max(self.peak, _high_water_mark() or 0)
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _reset_high_water_mark() -> bool:
    """Reset this process's peak RSS kept by the kernel; False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return _high_water_mark() is not None


def _high_water_mark() -> int | None:
    """This process's peak RSS in bytes since its last reset (VmHWM), or None."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def seconds(run: Callable[[], object]) -> float:
    """Wall time of one call of `run`."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def bare_outputs(
    queries: torch.Tensor, references: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`bare_matmul`'s outputs for whole blocks and the last partial one, written now: a fresh
    buffer's first touch is page faults, not FLOPs, and the engines reuse theirs too."""
    width = min(_BARE_BLOCK_ROWS, len(references))
    dtype = dtype or queries.dtype
    return (
        torch.zeros(len(queries), width, dtype=dtype),
        torch.zeros(len(queries), len(references) % _BARE_BLOCK_ROWS, dtype=dtype),
    )


def bare_matmul(
    queries: torch.Tensor, references: torch.Tensor, outputs: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """All query × reference dot products, block by block, into `outputs` (`bare_outputs`): the
    FLOPs alone."""
    whole, tail = outputs
    for start in range(0, len(references), _BARE_BLOCK_ROWS):
        block = references[start : start + _BARE_BLOCK_ROWS]
        out = whole if len(block) == whole.shape[1] else tail
        if queries.dtype == torch.int8:
            int8_mm(queries, block, out)
        else:
            torch.mm(queries, block.T, out=out)


def synthetic(n_queries: int, n_references: int, dim: int, data: str, seed: int):
    """(queries, references) float32: families as synth_scale.py builds them, or uniform noise."""
    rng = np.random.default_rng(seed)
    if data == "uniform":
        references = rng.standard_normal((n_references, dim), dtype=np.float32)
        return rng.standard_normal((n_queries, dim), dtype=np.float32), references
    centres = rng.standard_normal((2000, dim), dtype=np.float32)
    references = centres[rng.integers(0, 2000, n_references)]
    references += 0.6 * rng.standard_normal((n_references, dim), dtype=np.float32)
    queries = references[rng.integers(0, n_references, n_queries)]
    return queries + 0.3 * rng.standard_normal((n_queries, dim), dtype=np.float32), references


def oracle_neighbours(queries: np.ndarray, references: np.ndarray, metric: str, k: int) -> np.ndarray:
    """Indices (n, k) by (float32-rounded float64 distance, index): the answer by definition."""
    q, r = queries.astype(np.float64), references.astype(np.float64)
    if metric == "cosine":
        unit = r.astype(np.float32) * (1 / np.sqrt((r * r).sum(1))).astype(np.float32)[:, None]
        distances = 1 - (q / np.sqrt((q * q).sum(1, keepdims=True))) @ unit.astype(np.float64).T
        distances = np.clip(distances, 0, 2)
    else:
        distances = np.stack([np.sqrt(((row - r) ** 2).sum(1)) for row in q])
    distances = distances.astype(np.float32)
    index = np.broadcast_to(np.arange(len(r)), distances.shape)
    return np.lexsort((index, distances), axis=1)[:, :k]


def cdist_argsort(queries: np.ndarray, references: np.ndarray, metric: str, k: int) -> np.ndarray:
    """The original CPU path: the full distance matrix, then a full sort of every row."""
    return np.argsort(cdist(queries, references, metric), axis=1)[:, :k]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    parser.add_argument("--queries", type=int, default=2000, help="query rows")
    parser.add_argument("--references", type=int, default=100_000, help="reference rows")
    parser.add_argument("--dim", type=int, default=1024, help="embedding dimension")
    parser.add_argument("--k", type=int, default=5, help="neighbours per query")
    parser.add_argument("--metric", choices=METRICS, default="cosine")
    parser.add_argument("--data", choices=["families", "uniform"], default="families")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, medians reported")
    parser.add_argument("--cdist-queries", type=int, default=100, help="queries timed for cdist")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    parser.add_argument("--memmap", action="store_true", help="search float16 references mapped from disk")
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=["torch-auto", "torch-int8", "torch-fp32", "numpy-fp32"],
        default=["torch-auto", "torch-fp32", "numpy-fp32"],
        help="engines timed (fewer: a quicker run)",
    )
    args = parser.parse_args()

    queries, references = synthetic(args.queries, args.references, args.dim, args.data, args.seed)
    held_bytes = references.nbytes  # the copy the engine may share: not counted as its memory
    if args.memmap:
        folder = tempfile.TemporaryDirectory(prefix="fa-bench-search-")
        np.save(f"{folder.name}/vectors.npy", references.astype(np.float16))
        references, held_bytes = np.load(f"{folder.name}/vectors.npy", mmap_mode="r"), 0
    flops = 2.0 * args.queries * args.references * args.dim
    print(
        f"{args.queries:,} queries × {args.references:,} references × {args.dim} dims, k={args.k}, "
        f"{args.metric}, {args.data}; reference matrix {references.nbytes / GIB:.3f} GiB "
        f"{references.dtype}{' memory-mapped' if args.memmap else ''}; "
        f"torch threads {torch.get_num_threads()}, {psutil.cpu_count()} CPUs"
    )

    contenders = [tuple(name.split("-")) for name in args.engines]
    engines, memory_over_reference = {}, {}
    for backend, screening in contenders:
        baseline = psutil.Process().memory_info().rss
        with PeakRss() as peak:
            engine = SearchEngine(args.metric, backend, device="cpu", screening=screening)
            engine.build(references).search(queries, args.k)
        name = f"engine[{backend} {engine.screening}]"
        if name in engines:  # auto chose float32: nothing new to time
            continue
        engines[name] = engine
        memory_over_reference[name] = (peak.peak - baseline - held_bytes) / GIB

    sample = queries[:64]
    expected = oracle_neighbours(sample, references, args.metric, args.k)
    identical = all(np.array_equal(e.search(sample, args.k)[1], expected) for e in engines.values())

    # Repeats interleave the contenders so that load from other processes hits them alike.
    runs = {name: (lambda engine=engine: engine.search(queries, args.k)) for name, engine in engines.items()}
    query_tensor = torch.from_numpy(queries)
    reference_tensor = torch.from_numpy(np.asarray(references, dtype=np.float32))
    outputs_fp32 = bare_outputs(query_tensor, reference_tensor)
    runs["bare torch.mm float32"] = lambda: bare_matmul(query_tensor, reference_tensor, outputs_fp32)
    query_half, reference_half = query_tensor.bfloat16(), reference_tensor.bfloat16()
    outputs_bf16 = bare_outputs(query_half, reference_half)
    runs["bare torch.mm bfloat16"] = lambda: bare_matmul(query_half, reference_half, outputs_bf16)
    names = ["bare torch.mm float32", "bare torch.mm bfloat16"]
    if any("int8" in name for name in engines):  # the int8 screen's own limit
        query_int8, reference_int8 = (
            torch.ones_like(t, dtype=torch.int8) for t in (query_tensor, reference_tensor)
        )
        outputs_int8 = bare_outputs(query_int8, reference_int8, torch.int32)
        runs["bare torch._int_mm int8"] = lambda: bare_matmul(query_int8, reference_int8, outputs_int8)
        names.append("bare torch._int_mm int8")
    for name in names:
        runs[name]()  # oneDNN's kernel made before the clock, as the engines' are
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(seconds(run))
    median = {name: statistics.median(values) for name, values in times.items()}
    for name in engines:
        print(
            f"{name}: {median[name]:.3f} s, {flops / median[name] / 1e9:.1f} GFLOP/s, "
            f"peak memory beyond one reference copy {memory_over_reference[name]:.3f} GiB"
        )
    bare_fp32, bare_bf16 = median["bare torch.mm float32"], median["bare torch.mm bfloat16"]
    print(f"bare torch.mm float32: {bare_fp32:.3f} s, {flops / bare_fp32 / 1e9:.1f} GFLOP/s")
    print(f"bare torch.mm bfloat16: {bare_bf16:.3f} s, {flops / bare_bf16 / 1e9:.1f} GFLOP/s")
    if "bare torch._int_mm int8" in median:
        bare_int8 = median["bare torch._int_mm int8"]
        print(f"bare torch._int_mm int8: {bare_int8:.3f} s, {flops / bare_int8 / 1e9:.1f} GOP/s")
    engine_seconds = {name: median[name] for name in engines}
    del engines

    sliced = queries[: args.cdist_queries]
    cdist_seconds = seconds(lambda: cdist_argsort(sliced, references, args.metric, args.k))
    cdist_scaled = cdist_seconds * args.queries / len(sliced)
    print(
        f"cdist + argsort: {cdist_seconds:.3f} s for {len(sliced)} queries, "
        f"{cdist_scaled:.1f} s scaled to {args.queries:,}"
    )

    best = min(engine_seconds, key=engine_seconds.get)
    print(f"headline engine: {best}")
    print(f"neighbours_identical_to_float64_oracle={identical}  (64 queries, every engine)")
    print(f"engine_gflops={flops / engine_seconds[best] / 1e9:.1f}")
    print(f"speedup_vs_cdist_argsort={cdist_scaled / engine_seconds[best]:.1f}")
    for name, elapsed in engine_seconds.items():
        print(
            f"{name}: search_over_bare_fp32={elapsed / bare_fp32:.2f} search_over_bare_bf16={elapsed / bare_bf16:.2f}"
        )
    print(f"search_over_bare_fp32={engine_seconds[best] / bare_fp32:.2f}")
    print(f"search_over_bare_bf16={engine_seconds[best] / bare_bf16:.2f}  (target <= 1.5)")
    print(f"peak_memory_over_reference_GiB={memory_over_reference[best]:.3f}")


if __name__ == "__main__":
    main()
