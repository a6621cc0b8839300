"""Benchmark: summary.csv over ~4 M raw rows: polars `summarise` (before), DuckDB over Parquet (after),
and the in-memory path of small runs (memory, `core.aggregate_memory`, DuckDB's exact bytes).

    .venv/bin/python bench/summary.py [--queries 20000] [--partitions 4] [--neighbours 5]
                                      [--terms 10] [--repeats 3] [--memory-limit 1GB]

Builds synthetic raw rows in the layout the lookup writes (`parquet/{model}/layer_{k}/
raw_rows.parquet`, every SPEC §4.1 column, rows sorted by accession, rank, protein, GO id):
every query has `neighbours` neighbours in every partition, drawn from a few candidate
proteins per query (partitions find mostly the same proteins, in different orders); each
protein carries about `terms` GO terms from a pool per query (related proteins share terms);
alignment metrics are ratios of whole numbers like real identities. The default shape is
20,000 queries × 4 partitions × 5 neighbours × 10 terms = 4 M rows.

Each variant runs in a child process of its own, so that its peak RSS (`os.wait4`'s rusage)
is its own, with its CPU time (all threads): `before` reads the Parquet into one polars frame and runs the polars `summarise`
kept as the reference of the tests (what the lookup did before), then writes summary.csv with
the same writer; `after` is `aggregate.write_summary`, DuckDB over the Parquet under a memory
limit. The two files are compared line by line: they may differ only where a mean sits exactly
on a rounding tie, as `core/aggregate.py` explains. Medians over `repeats` runs, ratios last.
Target: after ≤ 3 s and ≤ 2 GiB peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

PROJECT = Path(__file__).resolve().parents[1]
MODELS = ("ProtT5", "ESM2")


def partition_dirs(count: int) -> list[tuple[str, int]]:
    """`count` (model, layer) pairs: the models alternate, layers count up."""
    return [(MODELS[i % len(MODELS)], i // len(MODELS)) for i in range(count)]


def write_synthetic(
    root: Path, queries: int, partitions: int, neighbours: int, terms: int, seed: int = 0
) -> list[Path]:
    """Raw rows Parquet of every partition under `root`; returns the files in partition order.

    Each query has a pool of `neighbours + 3` candidate reference proteins, each annotated with
    `terms` GO terms (Poisson) drawn from a pool of `2 × terms` terms per query, so that
    neighbours share terms; every partition picks `neighbours` of the candidates in its own
    order, as models and layers find mostly the same proteins in different orders.
    """
    from fantasia_assets.core import exports

    rng = np.random.default_rng(seed)
    candidates = neighbours + 3
    pool = 2 * terms
    go_vocabulary = np.array([f"GO:{i:07d}" for i in range(40_000)])
    categories = np.array(["P", "F", "C"])
    accessions = np.array([f"Q{i:06d}" for i in range(queries)])
    query_terms = rng.integers(0, len(go_vocabulary), (queries, pool))
    # candidate references: ids, sequence lengths, and their annotations (a CSR of term slots)
    ref_ids = rng.choice(10 * queries * candidates, (queries, candidates), replace=False) + 1
    ref_length = rng.integers(50, 600, (queries, candidates))
    n_terms = np.clip(rng.poisson(terms, (queries, candidates)), 1, pool)
    slots = np.argsort(rng.random((queries, candidates, pool)), axis=2)
    files = []
    for model, layer in partition_dirs(partitions):
        picks = np.argsort(rng.random((queries, candidates)), axis=1)[:, :neighbours]
        query = np.repeat(np.arange(queries), neighbours)
        rank = np.tile(np.arange(neighbours), queries)
        candidate = picks.ravel()
        distance = np.sort(rng.uniform(0.02, 0.6, (queries, neighbours)), axis=1).ravel()
        per_hit = n_terms[query, candidate]
        hit = np.repeat(np.arange(len(query)), per_hit)
        offsets = np.arange(len(hit)) - np.repeat(np.cumsum(per_hit) - per_hit, per_hit)
        q, c = query[hit], candidate[hit]
        picked = query_terms[q, slots[q, c, offsets]]
        ref = ref_ids[q, c]
        n = len(hit)
        aligned = ref_length[q, c] + rng.integers(0, 40, n)
        frame = pl.DataFrame(
            {
                "accession": accessions[q],
                "model_name": model,
                "embedding_type_id": 1 + MODELS.index(model),
                "layer_index": layer,
                "distance": distance[hit],
                "go_id": go_vocabulary[picked],
                "category": categories[picked % 3],
                "evidence_code": "EXP",
                "go_description": np.char.add("term ", (picked % 5000).astype(str)),
                "protein_id": np.char.add("P", ref.astype(str)),
                "organism": "Homo sapiens",
                "gene_name": np.char.add("G", ref.astype(str)),
                "query_idx": q,
                "ref_idx": ref,
                "query_len": ref_length[q, 0],
                "ref_len": ref_length[q, c],
                "reliability_index": 1.0 - distance[hit],
                "identity": rng.integers(10, 50, n) / aligned,
                "similarity": rng.integers(20, 50, n) / aligned,
                "alignment_score": rng.integers(10, 900, n),
                "gaps_percentage": rng.integers(0, 10, n) / aligned,
                "alignment_length": aligned,
                "identity_sw": rng.integers(10, 50, n) / (aligned - 5),
                "similarity_sw": rng.integers(20, 50, n) / (aligned - 5),
                "alignment_score_sw": rng.integers(10, 900, n),
                "gaps_percentage_sw": rng.integers(0, 10, n) / (aligned - 5),
                "alignment_length_sw": aligned - 5,
                "distance_metric": "cosine",
                "distance_threshold": None,
            },
            schema_overrides={"layer_index": pl.Int64, "distance_threshold": pl.Float64},
        ).with_columns(rank=rank[hit])
        frame = frame.sort("accession", "rank", "protein_id", "go_id").drop("rank")
        path = root / "parquet" / exports.model_dir_name(model) / f"layer_{layer}" / "raw_rows.parquet"
        exports.write_parquet_atomic(path, frame)
        files.append(path)
    return files


def _before(files: list[Path], out: Path, limit: int) -> int:
    from fantasia_assets.core import exports
    from fantasia_assets.core.summary import SummarySpec, summarise

    raw = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    summary = summarise(raw, SummarySpec.default(), limit)
    exports.write_bytes_atomic(out, exports.csv_bytes(summary, 4))
    return summary.height


def _after(files: list[Path], out: Path, limit: int, memory_limit: str) -> int:
    from fantasia_assets.core import aggregate
    from fantasia_assets.core.summary import SummarySpec

    with aggregate.parquet_connection({"raw_rows": files}, out.parent / "spill", memory_limit) as rows:
        return aggregate.write_summary(rows, SummarySpec.default(), limit, out, 4).rows


def _memory(files: list[Path], out: Path, limit: int) -> int:
    from fantasia_assets.core import aggregate_memory
    from fantasia_assets.core.summary import SummarySpec

    return aggregate_memory.write_summary(files, SummarySpec.default(), limit, out, 4).rows


def child(variant: str, files: list[Path], out: Path, limit: int, memory_limit: str) -> None:
    """One measured run, in its own process; prints seconds and summary rows as JSON."""
    started = time.perf_counter()
    if variant == "before":
        rows = _before(files, out, limit)
    elif variant == "memory":
        rows = _memory(files, out, limit)
    else:
        rows = _after(files, out, limit, memory_limit)
    print(json.dumps({"seconds": time.perf_counter() - started, "rows": rows}))


def measure(variant: str, files: list[Path], out: Path, limit: int, memory_limit: str) -> dict:
    """Run one variant in a child process: its wall time, summary rows and peak RSS (GiB)."""
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", variant, "--out", str(out), "--limit", str(limit),
         "--memory-limit", memory_limit, *map(str, files)],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(PROJECT)},
    )  # fmt: skip
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise SystemExit(f"{variant} failed with exit code {process.returncode}")
    result = json.loads(stdout)
    result["peak_gib"] = usage.ru_maxrss * 1024 / 2**30  # ru_maxrss is in KiB on Linux
    result["cpu"] = usage.ru_utime + usage.ru_stime  # all threads, imports and start-up included
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--neighbours", type=int, default=5)
    parser.add_argument("--terms", type=int, default=10, help="GO terms per neighbour (mean)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-limit", default="1GB", help="DuckDB memory_limit of the after variant")
    parser.add_argument("--limit", type=int, default=5, help=argparse.SUPPRESS)
    parser.add_argument(
        "--variants", default="before,after,memory", help="which to run, of before, after, memory"
    )
    parser.add_argument("--child", choices=["before", "after", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("files", nargs="*", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.files, args.out, args.limit, args.memory_limit)
        return

    work = Path(tempfile.mkdtemp(prefix="fantasia-bench-summary-"))
    try:
        started = time.perf_counter()
        files = write_synthetic(work, args.queries, args.partitions, args.neighbours, args.terms)
        rows = sum(pl.scan_parquet(f).select(pl.len()).collect().item() for f in files)
        size = sum(f.stat().st_size for f in files) / 2**20
        print(
            f"{rows:,} raw rows in {len(files)} partitions ({args.queries:,} queries × {args.neighbours} "
            f"neighbours × ~{args.terms} terms), Parquet {size:.0f} MiB, built in "
            f"{time.perf_counter() - started:.1f} s"
        )
        variants = args.variants.split(",")
        runs: dict[str, list[dict]] = {variant: [] for variant in variants}
        digests = {}
        for repeat in range(args.repeats):
            for variant in variants:  # side by side, so load from other jobs hits all
                out = work / variant / "summary.csv"
                out.parent.mkdir(exist_ok=True)
                result = measure(variant, files, out, args.limit, args.memory_limit)
                runs[variant].append(result)
                digests[variant] = hashlib.sha256(out.read_bytes()).hexdigest()
                print(
                    f"  run {repeat + 1} {variant:>6}: {result['seconds']:6.2f} s (process CPU "
                    f"{result['cpu']:.2f} s), peak RSS "
                    f"{result['peak_gib']:.2f} GiB, {result['rows']:,} summary rows"
                )
        if "after" in digests and "memory" in digests:
            print(f"summary.csv of memory and after byte-identical: {digests['memory'] == digests['after']}")
        medians = {
            variant: (
                statistics.median(r["seconds"] for r in results),
                statistics.median(r["peak_gib"] for r in results),
                statistics.median(r["cpu"] for r in results),
            )
            for variant, results in runs.items()
        }
        for variant, (seconds, peak, cpu) in medians.items():
            print(f"{variant:>6}: median {seconds:.2f} s, CPU {cpu:.2f} s, peak RSS {peak:.2f} GiB")
        for variant in ("after", "memory"):
            if variant in medians and "before" in medians:
                (before_s, before_rss, before_cpu), (new_s, new_rss, new_cpu) = (
                    medians["before"],
                    medians[variant],
                )
                print(
                    f"{variant} / before: CPU {new_cpu / before_cpu:.2f}, time {new_s / before_s:.2f}, "
                    f"peak RSS {new_rss / before_rss:.2f}"
                )
        print("targets: ≤ 3 s and ≤ 2 GiB peak RSS")
        if "before" in digests and "after" in digests:
            before_lines = (work / "before" / "summary.csv").read_bytes().split(b"\n")
            after_lines = (work / "after" / "summary.csv").read_bytes().split(b"\n")
            differ = sum(a != b for a, b in zip(before_lines, after_lines, strict=False))
            differ += abs(len(before_lines) - len(after_lines))
            print(
                f"before and after: {differ} of {len(before_lines) - 2:,} data lines differ (means on a rounding tie)"
            )
            if differ > 10:  # ties are rare: more than a handful of lines is a real difference
                raise SystemExit("the two summaries differ beyond rounding ties of means")
        if "after" in digests and "memory" in digests and digests["memory"] != digests["after"]:
            raise SystemExit("the in-memory summary differs from DuckDB's")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
