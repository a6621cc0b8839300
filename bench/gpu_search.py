"""GPU check of the search engine at FANTASIA's published size (needs numpy and torch only).

    python bench/gpu_search.py [--queries 20000] [--references 124000] [--dim 1024] [--k 5]

FANTASIA reports 17 s of distance computation and 127 s of lookup for 20,000 × 124,000 ×
1,024 on an RTX 3090 Ti. Target here: search ≤ 1 s. Prints the engine's time (references
uploaded once as float16, widened on the device), a bare float32 matmul of the same shape on
the same card (TF32 off, as the engine), and a float64 oracle check of 64 queries.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from fantasia_assets.core.knn import SearchEngine


def timed(run, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--references", type=int, default=124000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible")
    rng = np.random.default_rng(0)
    references = rng.standard_normal((args.references, args.dim), dtype=np.float32).astype(np.float16)
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)
    print(f"{torch.cuda.get_device_name()}: {args.queries:,} × {args.references:,} × {args.dim}, k={args.k}")

    engine = SearchEngine("cosine", "torch", "cuda")
    build = timed(lambda: engine.build(references), repeats=1)
    engine.search(queries[:1000], args.k)  # warm-up: CUDA context, kernels
    search = timed(lambda: engine.search(queries, args.k))

    q = torch.from_numpy(queries).cuda()
    r = torch.from_numpy(references).cuda().float()
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    block = 16384
    out = torch.empty(args.queries, block, device="cuda")

    def bare():
        for start in range(0, args.references, block):
            part = r[start : start + block]
            torch.mm(q, part.T, out=out if len(part) == block else None)

    matmul = timed(bare)
    torch.backends.cuda.matmul.allow_tf32 = previous

    sample = queries[:64].astype(np.float64)
    refs64 = references.astype(np.float64)
    qn = sample / np.linalg.norm(sample, axis=1, keepdims=True)
    rn = refs64 / np.linalg.norm(refs64, axis=1, keepdims=True)
    oracle = np.sort(1.0 - qn @ rn.T, axis=1)[:, : args.k]
    distances, _ = engine.search(queries[:64], args.k)
    error = float(np.abs(distances - oracle).max())

    flops = 2.0 * args.queries * args.references * args.dim
    print(f"build_seconds={build:.3f} (upload float16 + widen + normalise)")
    print(f"search_seconds={search:.3f} ({flops / search / 1e12:.1f} TFLOP/s)  target <= 1 s")
    print(f"bare_fp32_matmul_seconds={matmul:.3f} ({flops / matmul / 1e12:.1f} TFLOP/s)")
    print(f"search_over_matmul={search / matmul:.2f}")
    print(f"max_abs_distance_error_vs_float64_oracle={error:.2e}")


if __name__ == "__main__":
    main()
