"""Benchmark of the exact k-NN engine on the CPU, run by hand (not by CI).

Compares, on synthetic float32 data with a fixed seed and in one run:

* the engine (`fantasia_assets.core.knn.SearchEngine`, torch and numpy backends);
* a bare float32 matmul of the same shape (torch.mm of all queries against reference blocks):
  just the FLOPs, the physical limit of any exact search here;
* scipy cdist + argsort, the original CPU path, timed on a slice of the queries and scaled
  linearly to the full size;

and the engine's peak resident memory beyond one copy of the reference matrix. The last lines
are machine-readable ``name=value`` ratios::

    .venv/bin/python bench/search.py                       # 2,000 × 100,000 × 1,024, k=5, cosine
    .venv/bin/python bench/search.py --references 20000    # a quicker look
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable

import numpy as np
import psutil
import torch
from scipy.spatial.distance import cdist

from fantasia_assets.core.knn import BACKENDS, METRICS, SearchEngine

GIB = 2**30
_BARE_BLOCK_ROWS = 16384


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the docstring's layout in --help and shows each option's default."""


class PeakRss:
    """Highest resident set size of this process while the context is open, sampled every 2 ms
    in a thread (tracemalloc cannot see torch's or BLAS's allocations)."""

    def __enter__(self) -> PeakRss:
        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def seconds(run: Callable[[], object]) -> float:
    """Wall time of one call of `run`."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def bare_matmul(queries: torch.Tensor, references: torch.Tensor) -> None:
    """All query × reference dot products, block by block, into a reused output: the FLOPs alone."""
    output = torch.empty(len(queries), _BARE_BLOCK_ROWS)
    for start in range(0, len(references), _BARE_BLOCK_ROWS):
        block = references[start : start + _BARE_BLOCK_ROWS]
        torch.mm(queries, block.T, out=output if len(block) == _BARE_BLOCK_ROWS else None)


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
    parser.add_argument("--backends", nargs="+", choices=BACKENDS[:2], default=list(BACKENDS[:2]))
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats, medians reported")
    parser.add_argument("--cdist-queries", type=int, default=100, help="queries timed for cdist")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    references = rng.standard_normal((args.references, args.dim), dtype=np.float32)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    flops = 2.0 * args.queries * args.references * args.dim
    print(
        f"{args.queries:,} queries × {args.references:,} references × {args.dim} dims, k={args.k}, "
        f"{args.metric}; reference matrix {references.nbytes / GIB:.3f} GiB; "
        f"torch threads {torch.get_num_threads()}, {psutil.cpu_count()} CPUs"
    )

    engines, memory_over_reference = {}, {}
    for backend in args.backends:
        baseline = psutil.Process().memory_info().rss
        with PeakRss() as peak:
            engines[backend] = SearchEngine(args.metric, backend, device="cpu").build(references)
            engines[backend].search(queries, args.k)
        memory_over_reference[backend] = (peak.peak - baseline - references.nbytes) / GIB

    # Repeats interleave the contenders so that load from other processes hits them alike.
    runs = {
        f"engine[{backend}]": (lambda engine=engine: engine.search(queries, args.k))
        for backend, engine in engines.items()
    }
    query_tensor, reference_tensor = torch.from_numpy(queries), torch.from_numpy(references)
    runs["bare torch.mm"] = lambda: bare_matmul(query_tensor, reference_tensor)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            times[name].append(seconds(run))
    median = {name: statistics.median(values) for name, values in times.items()}
    for backend in engines:
        elapsed = median[f"engine[{backend}]"]
        print(
            f"engine[{backend}]: {elapsed:.3f} s, {flops / elapsed / 1e9:.1f} GFLOP/s, "
            f"peak memory beyond one reference copy {memory_over_reference[backend]:.3f} GiB"
        )
    bare_seconds = median["bare torch.mm"]
    print(f"bare torch.mm: {bare_seconds:.3f} s, {flops / bare_seconds / 1e9:.1f} GFLOP/s")
    engine_seconds = {backend: median[f"engine[{backend}]"] for backend in engines}
    del engines

    sliced = queries[: args.cdist_queries]
    cdist_seconds = seconds(lambda: cdist_argsort(sliced, references, args.metric, args.k))
    cdist_scaled = cdist_seconds * args.queries / len(sliced)
    print(
        f"cdist + argsort: {cdist_seconds:.3f} s for {len(sliced)} queries, "
        f"{cdist_scaled:.1f} s scaled to {args.queries:,}"
    )

    best = min(engine_seconds, key=engine_seconds.get)
    print(f"headline backend: {best}")
    print(f"engine_gflops={flops / engine_seconds[best] / 1e9:.1f}")
    print(f"speedup_vs_cdist_argsort={cdist_scaled / engine_seconds[best]:.1f}")
    print(f"throughput_vs_bare_matmul={bare_seconds / engine_seconds[best]:.3f}")
    print(f"peak_memory_over_reference_GiB={memory_over_reference[best]:.3f}")


if __name__ == "__main__":
    main()
