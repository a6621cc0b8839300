"""Benchmark of the search on a local Dask cluster against the same search in-process, run by hand.

Synthetic data from the shared `synth_scale.py` (references in families, queries perturbed
references; float16-rounded references as the cache holds them). Both sides search every query
batch of `--batch` queries with the same exact engine and must return identical arrays:

* in-process: build the engine on the matrix, search batch after batch (the CLI's loop);
* cluster: `core.distributed.DaskSearch` on a fresh local cluster of `--workers` single-thread
  workers (`dask scheduler` + `dask worker` of this venv): blocks planned from the workers'
  memory limits, each worker loading the matrix from the cache file once. The first run counts
  the workers' load and build (cold: compared with the in-process build + search), the second
  finds them built (warm: compared with the in-process search alone).

The in-process side runs before and after the cluster and is averaged, since the load of a
shared machine drifts.

On one machine the cluster cannot be faster than in-process (the same cores do the same
products); the point is the overhead. The last lines are ``name=value``::

    .venv/bin/python bench/distributed.py                                  # 20,000 × 124,000 × 1,024
    .venv/bin/python bench/distributed.py --queries 5000 --references 40000  # a quicker look
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# Run as a script, this file's folder comes first on sys.path and its name would shadow the
# `distributed` package the cluster client imports.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

SYNTH = Path(__file__).resolve().parents[2] / "shared" / "tools" / "synth_scale.py"


def synthetic(folder: Path, n_queries: int, n_references: int, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(queries float32, references float16) from synth_scale.py, generated once per size."""
    data = folder / f"synth-{n_queries}x{n_references}x{dim}"
    if not (data / "ref_emb.npy").exists():
        subprocess.run(
            [sys.executable, str(SYNTH), "--out", str(data), "--refs", str(n_references),
             "--queries", str(n_queries), "--dim", str(dim), "--plain"],
            check=True,
        )  # fmt: skip
    queries = np.load(data / "query_emb.npy").astype(np.float32)
    references = np.load(data / "ref_emb.npy").astype(np.float16)
    return queries, references


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--references", type=int, default=124_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--batch", type=int, default=516, help="queries per search batch (lookup.batch_size)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--memory-limit", default="6GiB", help="per worker")
    parser.add_argument(
        "--data", type=Path, default=Path(tempfile.gettempdir()) / "fantasia-bench-distributed"
    )
    args = parser.parse_args()
    import torch

    from fantasia_assets.core.distributed import BlockSettings, DaskSearch, MatrixFile
    from fantasia_assets.core.knn import SearchEngine
    from fantasia_assets_tests.dask_cluster import start_cluster

    queries, references = synthetic(args.data, args.queries, args.references, args.dim)
    cache = args.data / f"matrix-bench-{args.queries}x{args.references}x{args.dim}.npz"
    if not cache.exists():
        np.savez(cache, sequence_ids=np.arange(len(references), dtype=np.int64), vectors=references)
    print(f"{len(queries)} queries × {len(references)} references × {args.dim}, k={args.k}, "
          f"batches of {args.batch}; torch threads in-process: {torch.get_num_threads()}")  # fmt: skip

    def in_process() -> tuple[float, float, list]:
        """(build seconds, search seconds, batches) of the CLI's in-process loop."""
        started = time.perf_counter()
        engine = SearchEngine("cosine", "torch", "cpu").build(references)
        built = time.perf_counter()
        found = [
            engine.search(queries[start : start + args.batch], args.k)
            for start in range(0, len(queries), args.batch)
        ]
        return built - started, time.perf_counter() - built, found

    build_before, search_before, expected = in_process()
    print(f"in-process: build {build_before:.2f} s, search {search_before:.2f} s")

    cluster = start_cluster(args.data / "cluster", args.workers, args.memory_limit)
    try:
        matrix = MatrixFile(str(cache), f"bench-{args.references}", len(references), args.dim)
        settings = BlockSettings("cosine", "torch", False, args.k, None, False, args.batch, 0)
        times = []
        with DaskSearch(cluster.address) as search:
            for _ in range(2):
                started = time.perf_counter()
                found = [batch for _, batch in search.search(matrix, settings, queries, None, "bench")]
                times.append(time.perf_counter() - started)
                identical = len(found) == len(expected) and all(
                    np.array_equal(d, ed) and np.array_equal(i, ei)
                    for (d, i), (ed, ei) in zip(found, expected, strict=True)
                )
                if not identical:
                    raise SystemExit("the cluster's neighbours differ from the in-process ones")
            plan = search.plans["bench"]
    finally:
        cluster.stop()
    # again after the cluster runs: on a shared machine the load drifts, so both sides are averaged
    build_after, search_after, _ = in_process()
    print(f"in-process again: build {build_after:.2f} s, search {search_after:.2f} s")
    build = (build_before + build_after) / 2
    in_process_search = (search_before + search_after) / 2
    cold, warm = times
    print(f"cluster: {plan.n_blocks} blocks of ≤ {plan.block_queries} queries on {args.workers} workers; "
          f"cold {cold:.2f} s (workers load the cache file and build), warm {warm:.2f} s; identical: yes")  # fmt: skip
    print(f"cold_overhead={cold / (build + in_process_search) - 1:+.3f}  # vs in-process build + search")
    print(f"warm_overhead={warm / in_process_search - 1:+.3f}  # vs in-process search, engines kept")


if __name__ == "__main__":
    main()
