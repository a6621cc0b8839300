"""Benchmark: alignment metrics the fast way against FANTASIA's traceback way, on real pairs.

    .venv/bin/python bench/alignment.py [--pairs 5000] [--workers N] [--shared ../shared/data]

Pairs: 1,000 mouse queries (`queries_mouse.h5`, seeded choice) × 5 human references
(`reference_human.h5`): the query's ortholog (same gene symbol) when the human set has it, as
a nearest neighbour often is, the others drawn at random; sequences from `sequences.fasta.gz`.
`--pairs` takes the first n of these.

Times `traceback_metrics` over every pair on one thread (parasail's ``*_trace_striped_32``
kernels and the counting of their traceback strings, as FANTASIA does), then
`alignment_metrics` on all cores, and checks the two give identical numbers. Before that it
times single kernels on the first `--kernel-pairs` pairs, one thread, to show why the fast path
uses the 16-bit scan traceback kernels rather than the stats ones. The last three lines are
`pairs=`, `identical=` and `speedup_vs_traceback=` (traceback time / fast time, target ≥ 3).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import h5py
import numpy as np
import parasail
import polars as pl

from fantasia_assets.core.alignment import METRIC_COLUMNS, alignment_metrics, traceback_metrics
from fantasia_assets.db.sources import read_fasta

QUERIES = 1000
REFERENCES_PER_QUERY = 5
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument(
        "--pairs", type=int, default=QUERIES * REFERENCES_PER_QUERY, help="pairs to align, ≤ 5000"
    )
    parser.add_argument("--workers", type=int, default=None, help="fast-path threads (default: all CPUs)")
    parser.add_argument(
        "--kernel-pairs", type=int, default=300, help="pairs for single-kernel timings, 0 skips"
    )
    args = parser.parse_args()

    pairs = real_pairs(args.shared)[: args.pairs]
    queries, references = [q for q, _ in pairs], [r for _, r in pairs]
    cells = sum(len(q) * len(r) for q, r in pairs)
    print(
        f"{len(pairs)} pairs, {cells / 1e6:.0f} M cells, lengths {min(map(len, queries + references))}"
        f"-{max(map(len, queries + references))} aa, {os.cpu_count()} CPUs"
    )
    if args.kernel_pairs:
        compare_kernels(pairs[: args.kernel_pairs])

    started = time.perf_counter()
    expected = pl.DataFrame([traceback_metrics(q, r) for q, r in pairs]).select(METRIC_COLUMNS)
    traceback_seconds = time.perf_counter() - started
    print(
        f"traceback_metrics, 1 thread: {traceback_seconds:.2f} s ({len(pairs) / traceback_seconds:.0f} pairs/s)"
    )

    started = time.perf_counter()
    fast = alignment_metrics(queries, references, workers=args.workers)
    fast_seconds = time.perf_counter() - started
    workers = args.workers or os.cpu_count()
    print(
        f"alignment_metrics, {workers} threads: {fast_seconds:.2f} s ({len(pairs) / fast_seconds:.0f} pairs/s)"
    )

    identical = fast.columns == expected.columns and bool((fast.to_numpy() == expected.to_numpy()).all())
    print(f"pairs={len(pairs)}")
    print(f"identical={identical}")
    print(f"speedup_vs_traceback={traceback_seconds / fast_seconds:.2f}")


def real_pairs(shared: Path) -> list[tuple[str, str]]:
    """The benchmark's (mouse query, human reference) sequence pairs, in a fixed order."""
    frame = read_fasta(shared / "sequences.fasta.gz")
    sequences = dict(zip(frame["accession"], frame["sequence"], strict=True))
    mouse, human = _accessions(shared / "queries_mouse.h5"), _accessions(shared / "reference_human.h5")
    symbols = pl.read_csv(
        shared / "annotations_human_mouse.tsv.gz", separator="\t", columns=["accession", "db_object_symbol"]
    ).unique("accession", keep="first")
    symbol_of = dict(zip(symbols["accession"], symbols["db_object_symbol"].str.to_uppercase(), strict=True))
    human_by_symbol: dict[str, str] = {}
    for accession in human:
        if accession in symbol_of:
            human_by_symbol.setdefault(symbol_of[accession], accession)
    rng = np.random.default_rng(SEED)
    pairs = []
    for query in rng.choice(mouse, size=QUERIES, replace=False):
        ortholog = human_by_symbol.get(symbol_of.get(query))
        picked = [ortholog] if ortholog else []
        while len(picked) < REFERENCES_PER_QUERY:
            picked.append(human[int(rng.integers(len(human)))])
        pairs += [(sequences[query], sequences[reference]) for reference in picked]
    return pairs


def compare_kernels(pairs: list[tuple[str, str]]) -> None:
    """Seconds of each candidate parasail kernel over `pairs`, one thread, best of two runs."""
    matrix = parasail.blosum62
    encoded = [(q.encode(), r.encode()) for q, r in pairs]
    print(f"single kernels over {len(pairs)} pairs, 1 thread (global + local):")
    candidates = {
        "trace striped 32 + traceback (FANTASIA)": ("trace_striped_32", True),
        "stats striped 16": ("stats_striped_16", False),
        "stats scan 16": ("stats_scan_16", False),
        "stats diag 16": ("stats_diag_16", False),
        "trace scan 16 + traceback (fast path)": ("trace_scan_16", True),
    }
    for label, (suffix, traceback) in candidates.items():
        kernels = (getattr(parasail, "nw_" + suffix), getattr(parasail, "sw_" + suffix))
        best = float("inf")
        for _ in range(2):
            started = time.perf_counter()
            for query, reference in encoded:
                for kernel in kernels:
                    result = kernel(query, reference, 10, 1, matrix)
                    if traceback:
                        result.get_traceback()
            best = min(best, time.perf_counter() - started)
        print(f"  {label:42s} {best:6.2f} s")


def _accessions(path: Path) -> list[str]:
    with h5py.File(path, "r") as handle:
        return sorted(name.removeprefix("accession_") for name in handle)


if __name__ == "__main__":
    main()
