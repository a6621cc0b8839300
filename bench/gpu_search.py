"""GPU check of the search engine at FANTASIA's published size (needs numpy, scipy, psutil, torch).

    python bench/gpu_search.py [--queries 20000] [--references 124000] [--dim 1024] [--k 5]

FANTASIA reports 17 s of distance computation and 127 s of lookup for 20,000 × 124,000 ×
1,024 on an RTX 3090 Ti. Target on an H100/H200: search ≤ 0.1 s with the tensor-core screen.
Prints, on family-structured synthetic data (as synth_scale.py builds it): the engine's time
with the 16-bit tensor-core screen (the card's bf16 or fp16) and with the float32 screen
(references uploaded once as float16); bare float32 (TF32 off, as the engine) and bfloat16
matmuls of the same shape; whether 64 queries' neighbours equal a float64 brute force's; and
the largest ratio of the screen's measured error to its bound (`knn_bounds`) over 64 queries
and every reference, which must stay ≤ 1: it checks the bound's accumulation model on this card.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from search import oracle_neighbours, synthetic

from fantasia_assets.core import screen
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


def bare(queries: torch.Tensor, references: torch.Tensor, block: int = 16384) -> None:
    out = torch.empty(len(queries), block, dtype=queries.dtype, device="cuda")
    for start in range(0, len(references), block):
        part = references[start : start + block]
        torch.mm(queries, part.T, out=out if len(part) == block else None)


def worst_error_over_bound(engine: SearchEngine, queries: np.ndarray) -> float:
    """max |s̃ - T| / bound over every (query, reference): cosine, T in float64."""
    q32 = queries.astype(np.float32)
    fast, offsets, exact, coefficients = engine._prepare_queries(q32, (q32.astype(np.float64) ** 2).sum(1))
    none = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    with screen.exact_matmul_settings():
        values, indices = engine._screen(fast, none, engine.n_references)
    scores = torch.empty_like(values).scatter_(1, indices, values)
    scores += torch.from_numpy(offsets).to(scores.device)[:, None]
    target = 1 - exact @ engine._reference.double().T
    bound = torch.from_numpy(coefficients[:, :1]).to(scores.device)
    return float(((scores - target).abs() / bound).max())


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
    queries, references = synthetic(args.queries, args.references, args.dim, "families", 0)
    references = references.astype(np.float16)
    name = torch.cuda.get_device_name()
    print(f"{name}: {args.queries:,} × {args.references:,} × {args.dim}, k={args.k}")
    flops = 2.0 * args.queries * args.references * args.dim

    expected = oracle_neighbours(queries[:64], references, "cosine", args.k)
    half_search = None
    for screening in ("auto", "fp32"):
        engine = SearchEngine("cosine", "torch", "cuda", screening=screening)
        build = timed(lambda engine=engine: engine.build(references), repeats=1)
        engine.search(queries[:1000], args.k)  # warm-up: CUDA context, kernels
        search = timed(lambda engine=engine: engine.search(queries, args.k))
        identical = np.array_equal(engine.search(queries[:64], args.k)[1], expected)
        ratio = worst_error_over_bound(engine, queries[:64])
        label = engine.screening
        print(f"[{label}] build_seconds={build:.3f} (upload float16, widen, normalise, operands)")
        print(f"[{label}] search_seconds={search:.3f} ({flops / search / 1e12:.1f} TFLOP/s)")
        print(f"[{label}] neighbours_identical_to_float64_oracle={identical}")
        print(f"[{label}] max_error_over_bound={ratio:.3f}  (must be <= 1)")
        if screening == "auto" and label != "fp32":
            half_search = search
        del engine
        torch.cuda.empty_cache()

    q, r = torch.from_numpy(queries).cuda(), torch.from_numpy(references).cuda().float()
    q_half, r_half = q.bfloat16(), r.bfloat16()
    with screen.exact_matmul_settings():
        fp32 = timed(lambda: bare(q, r))
        bf16 = timed(lambda: bare(q_half, r_half))
    print(f"bare_fp32_matmul_seconds={fp32:.3f} ({flops / fp32 / 1e12:.1f} TFLOP/s)")
    print(f"bare_bf16_matmul_seconds={bf16:.3f} ({flops / bf16 / 1e12:.1f} TFLOP/s)")
    if half_search is None:
        print("this card has no 16-bit tensor-core screen: auto screened in float32")
        return
    print(f"search_over_bare_bf16={half_search / bf16:.2f}")
    print(f"search_seconds={half_search:.3f}  (target <= 0.1 s on an H100/H200)")


if __name__ == "__main__":
    main()
