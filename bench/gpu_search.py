"""GPU check of the search engine at FANTASIA's published size (needs numpy, scipy, psutil, torch).

    python bench/gpu_search.py [--queries 20000] [--references 124000] [--dim 1024] [--k 5]
    .venv/bin/python bench/gpu_search.py --device cpu --queries 500 --references 5000   # rehearsal

FANTASIA reports 17 s of distance computation and 127 s of lookup for 20,000 × 124,000 ×
1,024 on an RTX 3090 Ti. Target on an H100/H200: search ≤ 0.1 s with the tensor-core screen.
Prints, on family-structured synthetic data (as synth_scale.py builds it): the engine's time
with the 16-bit tensor-core screen (the card's bf16 or fp16) and with the float32 screen
(references uploaded once as float16); bare float32 (TF32 off, as the engine) and bfloat16
matmuls of the same shape; whether 64 queries' neighbours equal a float64 brute force's; and
the largest ratio of the screen's measured error to its bound (`knn_bounds`) over 64 queries
and every reference, which must stay ≤ 1: it checks the bound's accumulation model on this card.
Each screen is checked first at a small size (500 × 5,000), then at the full one; a screen that
fails prints its traceback and the script goes on, so one device run reports all it can.
`--device cpu` rehearses the script here (the CPU's bf16 or float32 screen) before a device run.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback

import numpy as np
import torch
from search import oracle_neighbours, synthetic

from fantasia_assets.core import knn, screen
from fantasia_assets.core.knn import SearchEngine


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(run, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        synchronize()
        started = time.perf_counter()
        run()
        synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bare(queries: torch.Tensor, references: torch.Tensor, block: int = 16384) -> None:
    out = torch.empty(len(queries), block, dtype=queries.dtype, device=queries.device)
    for start in range(0, len(references), block):
        part = references[start : start + block]
        torch.mm(queries, part.T, out=out if len(part) == block else None)


def worst_error_over_bound(engine: SearchEngine, queries: np.ndarray) -> float:
    """max |s̃ - T| / bound over every (query, reference), cosine: s̃ the screen's score, T the
    float64 score of the same unit query and prepared reference rows, the bound `knn_bounds`'s
    per-query term plus each score's output rounding (as the engine's own bound test)."""
    q32 = queries.astype(np.float32)
    fast, offsets, _, coefficients = engine._prepare_queries(q32, (q32.astype(np.float64) ** 2).sum(1))
    none = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64))
    with screen.exact_matmul_settings():
        values, indices = engine._screen(fast, none, engine.n_references)
    device = values.device
    scores = torch.empty_like(values).scatter_(
        1, indices, values + torch.from_numpy(offsets).to(device)[:, None]
    )
    rounding = torch.empty_like(values).scatter_(
        1, indices, screen.output_error(values, engine.arithmetic).double()
    )
    q = torch.from_numpy(q32).to(device, torch.float64)
    unit = q / q.norm(dim=1, keepdim=True).clamp_min(1e-300)
    target = 1 - unit @ engine._references.prepared(0, engine.n_references).double().T
    bound = torch.from_numpy(coefficients[:, :1]).to(device) + rounding
    return float(((scores - target).abs() / bound).max())


def stage_split(engine: SearchEngine, queries: np.ndarray, k: int) -> str:
    """Seconds of one search's stages (each call synchronised before and after), as one line."""
    totals: dict[str, float] = {}
    originals = {}
    for name in ("_prepare_queries", "_screen", "_settle", "_refine"):
        original = originals[name] = getattr(engine, name)

        def timed_stage(*args, _name=name, _original=original, **kwargs):
            synchronize()
            started = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                synchronize()
                totals[_name] = totals.get(_name, 0.0) + time.perf_counter() - started

        setattr(engine, name, timed_stage)
    try:
        started = time.perf_counter()
        engine.search(queries, k)
        synchronize()
        whole = time.perf_counter() - started
    finally:
        for name in originals:
            delattr(engine, name)
    parts = " ".join(f"{name.strip('_')}={seconds:.3f}" for name, seconds in totals.items())
    return f"whole={whole:.3f} {parts} (refine is inside settle)"


def check_screen(screening: str, device: str, queries, references, k: int, flops: float) -> float | None:
    """Build, time and check one screen; prints its lines and returns the search seconds of a
    16-bit screen (None for float32)."""
    engine = SearchEngine("cosine", "torch", device, screening=screening)
    build = timed(lambda: engine.build(references), repeats=1)
    engine.search(queries[: min(1000, len(queries))], k)  # warm-up: CUDA context, kernels
    search = timed(lambda: engine.search(queries, k))
    sample = queries[:64]
    identical = np.array_equal(
        engine.search(sample, k)[1], oracle_neighbours(sample, references, "cosine", k)
    )
    ratio = worst_error_over_bound(engine, sample)
    label = f"{engine.screening} {len(queries)}x{len(references)}"
    print(f"[{label}] stages: {stage_split(engine, queries, k)}")
    if device == "cuda":
        step = engine._device_refine_pairs()
        engine._device_refine_pairs = lambda: knn._REFINE_PAIRS  # the step before this one
        small = timed(lambda: engine.search(queries, k))
        del engine._device_refine_pairs
        print(
            f"[{label}] search_seconds_with_{knn._REFINE_PAIRS}_pair_refine_steps={small:.3f} "
            f"(now {step} pairs a step)"
        )
    print(f"[{label}] build_seconds={build:.3f} (upload float16, widen, normalise, operands)")
    print(f"[{label}] search_seconds={search:.3f} ({flops / search / 1e12:.2f} TFLOP/s)")
    print(f"[{label}] neighbours_identical_to_float64_oracle={identical}")
    print(f"[{label}] max_error_over_bound={ratio:.3f}  (must be <= 1)")
    return search if engine.screening != "fp32" else None


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=20000)
    parser.add_argument("--references", type=int, default=124000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device visible (--device cpu rehearses the script)")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    sizes = [(min(500, args.queries), min(5000, args.references)), (args.queries, args.references)]
    half_search = None
    for n_queries, n_references in dict.fromkeys(sizes):
        started = time.perf_counter()
        queries, references = synthetic(n_queries, n_references, args.dim, "families", 0)
        references = references.astype(np.float16)
        print(
            f"{name}: {n_queries:,} × {n_references:,} × {args.dim}, k={args.k} "
            f"(data made in {time.perf_counter() - started:.1f} s)"
        )
        flops = 2.0 * n_queries * n_references * args.dim
        for screening in ("auto", "fp32"):
            try:
                search = check_screen(screening, args.device, queries, references, args.k, flops)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()  # the engine is gone: its buffers go back
            except Exception:  # report and go on: one device run must say all it can
                print(f"[{screening} {n_queries}x{n_references}] FAILED")
                traceback.print_exc()
                continue
            if search is not None and n_queries == args.queries:
                half_search = search

    q = torch.from_numpy(queries).to(args.device)
    r = torch.from_numpy(references).to(args.device).float()
    q_half, r_half = q.bfloat16(), r.bfloat16()
    with screen.exact_matmul_settings():
        fp32 = timed(lambda: bare(q, r))
        bf16 = timed(lambda: bare(q_half, r_half))
    print(f"bare_fp32_matmul_seconds={fp32:.3f} ({flops / fp32 / 1e12:.2f} TFLOP/s)")
    print(f"bare_bf16_matmul_seconds={bf16:.3f} ({flops / bf16 / 1e12:.2f} TFLOP/s)")
    if half_search is None:
        print("no 16-bit screen ran at the full size (failed, or none here): see above")
        return
    print(f"search_over_bare_bf16={half_search / bf16:.2f}")
    print(f"search_seconds={half_search:.3f}  (target <= 0.1 s on an H100/H200)")


if __name__ == "__main__":
    main()
