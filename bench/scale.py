"""Benchmark at FANTASIA's published size: the whole lookup, cold from the database, against the
bare matmuls of the same shape, with stage splits and peak resident memory.

    .venv/bin/python bench/scale.py                    # 20,000 × 124,000 × 1,024, k = 5, cosine
    .venv/bin/python bench/scale.py --queries 2000 --references 12400   # a quicker look
    .venv/bin/python bench/scale.py --million --data DIR   # 5,000 × 1,000,000 × 1,024, RSS-bounded

Data: ``../shared/tools/synth_scale.py --plain`` (references are noisy members of 2,000
families, queries perturbed references), generated into a temporary directory (or ``--data``
DIR, kept from an earlier run). The references
go into a fresh embedded database with COPY (float16 halfvec, as the loader stores them; five
GO annotations each from the sample ontology), the queries stay in synth_scale's HDF5. Then,
in this process, `--repeats` rounds (3) of: one lookup with alignment off whose reference matrix
comes from the database (cold: the home's caches, the kept engine and the outputs removed
first), its peak RSS (the kernel's high-water mark, `search.PeakRss`), then the bare float32
and bfloat16 matmuls of the same shape; medians of the rounds (a busy machine's speed drifts by
tens of per cent between minutes, so one sample of each is not a ratio). Then a float64
brute-force check of 64 queries' neighbours, and `--repeats` searches of the built engine alone, each beside a bare
bfloat16 matmul (the lookup's search stage also holds the engine's build and shares the cores
with the reads it starts beside the products). Targets: the whole cold lookup
≤ 0.6 × the bare float32 matmul; its search stage ≤ 1.5 × the bare bfloat16 matmul.

`--million` (issue 11, item 4): a million references (`bench/million.py`: COPY in blocks into
the embedded database under DIR/home, kept for later runs) and a 5,000-query lookup run by the
CLI in a child process, cold (matrix streamed from the database into the float16 cache), then
warm (the cache memory-mapped; the engine prepares its operands and keeps them beside the
cache, `core/knn_reference.py`), then kept (warm again: the engine reads the kept operands);
each prints its stage table, wall time and the kernel's peak RSS of the child (ru_maxrss; the PostgreSQL server's own processes are not in it). Target:
peak RSS ≤ 6 GiB. `--loader N` also writes files for N references and times `load-references`
on them, with its peak RSS.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from lookup import bare_matmul_seconds, insert_references, search_seconds
from machine import Steal, Usage, first_touch_ms_per_mib
from search import PeakRss, oracle_neighbours

GIB = 2**30
SYNTH = Path(__file__).resolve().parents[2] / "shared" / "tools" / "synth_scale.py"


def generate(synth: Path, out: Path, n_references: int, n_queries: int, dim: int) -> None:
    """Run synth_scale.py --plain in this process, without its refs.h5: this benchmark loads the
    references from ref_emb.npy, and writing 124,000 HDF5 groups would take most of an hour."""
    spec = importlib.util.spec_from_file_location("synth_scale", synth)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    write_h5 = module.write_h5
    module.write_h5 = lambda path, *rest: None if path.endswith("/refs.h5") else write_h5(path, *rest)
    argv = sys.argv
    sys.argv = [str(synth), "--out", str(out), "--refs", str(n_references), "--queries", str(n_queries),
                "--dim", str(dim), "--plain"]  # fmt: skip
    try:
        module.main()
    finally:
        sys.argv = argv


def cold_again(work: Path, experiment: Path) -> None:
    """Make the next lookup as cold as the first: no cache under the run's home (reference
    matrix, annotation table, sequence files, stamp), no engine kept in this process, no
    outputs (a re-run would be incremental)."""
    from fantasia_assets.core import stages

    shutil.rmtree(work / "home" / "cache", ignore_errors=True)
    shutil.rmtree(experiment, ignore_errors=True)
    stages._idle_engine.clear()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--references", type=int, default=124_000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--screening", choices=["auto", "bf16", "int8", "fp32"], default="auto")
    parser.add_argument("--synth", type=Path, default=SYNTH, help="path of synth_scale.py")
    parser.add_argument(
        "--data",
        type=Path,
        help="a directory for synth_scale.py --plain's files of this shape: written there when "
        "absent, read by later runs",
    )
    parser.add_argument("--million", action="store_true", help="the million-reference case (see above)")
    parser.add_argument("--loader", type=int, default=0, help="with --million: load-references on N refs")
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds of (cold lookup, bare fp32, bare bf16); medians"
    )
    args = parser.parse_args()
    if args.million:
        million_case(args)
        return
    work = Path(tempfile.mkdtemp(prefix="fa-bench-scale-"))
    os.environ["FANTASIA_HOME"] = str(work / "home")
    os.environ.pop("FANTASIA_DATABASE_URL", None)

    from fantasia_assets.cli import report_lines
    from fantasia_assets.config import parse_config
    from fantasia_assets.core.knn import SearchEngine
    from fantasia_assets.db import get_engine, schema_ready
    from fantasia_assets.db.embedded import embedded_server
    from fantasia_assets.db.engine import dispose_engines
    from fantasia_assets.runner import run_lookup

    try:
        started = time.perf_counter()
        data = args.data or work / "synth"
        if not (data / "ref_emb.npy").exists():  # a --data DIR is kept for later runs
            generate(args.synth, data, args.references, args.queries, args.dim)
        print(f"synthetic data: {time.perf_counter() - started:.1f} s")
        started = time.perf_counter()
        engine = get_engine()
        schema_ready(engine)
        insert_references(
            engine, np.load(data / "ref_emb.npy").astype(np.float16), 5, np.random.default_rng(0)
        )
        print(f"database load (COPY): {time.perf_counter() - started:.1f} s")
        config = parse_config(
            {
                "experiment_path": str(work / "experiment"),
                "embeddings_path": str(data / "queries.h5"),
                "limit_per_entry": args.k,
                "lookup": {"use_gpu": False, "batch_size": args.queries, "screening": args.screening},
                "embedding": {"models": {"Synthetic": {"layer_index": [0]}}},
                "postprocess": {"alignment": False},
            }
        )
        queries = np.load(data / "query_emb.npy")
        references = np.load(data / "ref_emb.npy").astype(np.float16)
        rounds = []  # (cold lookup, search, bare float32, bare bf16, peak RSS) per round
        for round_ in range(args.repeats):
            cold_again(work, config.experiment_path)
            with PeakRss() as peak, Steal() as steal, Usage() as usage:
                started = time.perf_counter()
                result = run_lookup(config, engine)
                cold = time.perf_counter() - started
            print(
                f"--- round {round_ + 1}: cold lookup {cold:.2f} s, peak RSS {peak.peak / GIB:.2f} GiB, "
                f"{usage.text()}, CPU taken by the hypervisor meanwhile {steal.text()}"
            )
            if round_ == 0:
                for line in report_lines(result):
                    if line and not line.startswith("  ") and not line.startswith("outputs"):
                        print(line)
            matmul = bare_matmul_seconds(queries, references, "cpu", repeats=1)
            matmul_bf16 = bare_matmul_seconds(queries, references, "cpu", "bfloat16", repeats=1)
            search = search_seconds(result)
            rounds.append((cold, search, matmul, matmul_bf16, peak.peak / GIB))
            print(
                f"    search {search:.2f} s, bare fp32 {matmul:.2f} s, bare bf16 {matmul_bf16:.2f} s: "
                f"lookup/fp32 {cold / matmul:.2f}, search/bf16 {search / matmul_bf16:.2f}"
            )
        engine_64 = SearchEngine("cosine", "torch", "cpu", screening=args.screening).build(references)
        found = engine_64.search(queries[:64], args.k)[1]
        identical = np.array_equal(found, oracle_neighbours(queries[:64], references, "cosine", args.k))
        # the engine alone, built: the search stage above also holds the engine's build and
        # shares the cores with the reads started beside the products
        alone = []  # (engine search, bare bf16) per round
        for _ in range(args.repeats):
            started = time.perf_counter()
            engine_64.search(queries, args.k)
            alone.append(
                (
                    time.perf_counter() - started,
                    bare_matmul_seconds(queries, references, "cpu", "bfloat16", 1),
                )
            )
        engine_alone = statistics.median(a / b for a, b in alone)

        cold, search, matmul, matmul_bf16, peak_gib = (
            statistics.median(column) for column in zip(*rounds, strict=True)
        )
        flops = 2.0 * args.queries * args.references * args.dim
        print()
        print(
            f"shape={args.queries}x{args.references}x{args.dim} k={args.k} "
            f"screening={args.screening} (screened in {engine_64.screening})"
        )
        print(f"rounds={args.repeats} (each: a cold lookup, then both bare matmuls; medians below)")
        print(f"bare_fp32_matmul_seconds={matmul:.3f} ({flops / matmul / 1e9:.0f} GFLOP/s)")
        print(f"bare_bf16_matmul_seconds={matmul_bf16:.3f} ({flops / matmul_bf16 / 1e9:.0f} GFLOP/s)")
        print(f"cold_lookup_seconds={cold:.3f}")
        print(f"search_seconds={search:.3f}")
        print(f"peak_rss_GiB={peak_gib:.2f}")
        print(f"neighbours_identical_to_float64_oracle={identical}  (64 queries)")
        print(f"search_over_bare_fp32={search / matmul:.2f}")
        print(f"search_over_bare_bf16={search / matmul_bf16:.2f}  (target <= 1.5)")
        print(
            f"engine_search_alone_over_bare_bf16={engine_alone:.2f}  (median of {args.repeats}: "
            + ", ".join(f"{a:.2f} s / {b:.2f} s" for a, b in alone)
            + "; the built engine's search, no build, nothing beside it)"
        )
        print(f"cold_lookup_over_bare_bf16={cold / matmul_bf16:.2f}")
        print(f"cold_lookup_over_bare_fp32={cold / matmul:.2f}  (target <= 0.6)")
        ratios = [(r[0] / r[2], r[1] / r[3]) for r in rounds]
        print(
            "per-round ratios (lookup/fp32, search/bf16): "
            + ", ".join(f"{a:.2f}/{b:.2f}" for a, b in ratios)
            + f"; medians of the rounds' own ratios: {statistics.median(a for a, _ in ratios):.2f}"
            + f"/{statistics.median(b for _, b in ratios):.2f}"
        )
        first, second = first_touch_ms_per_mib()
        print(
            f"machine: first touch of newly mapped memory {first:.2f} ms/MiB, second {second:.3f} ms/MiB "
            "(a lookup touches GiBs of memory afresh, and its page faults count in its system CPU "
            "above; the bare matmuls' buffers are touched before they are timed)"
        )
    finally:
        dispose_engines()
        embedded_server().cleanup()
        shutil.rmtree(work, ignore_errors=True)


def million_case(args: argparse.Namespace) -> None:
    """5,000 queries × 1,000,000 references (or --queries/--references if given smaller) by the CLI."""
    import million
    import yaml

    n_refs = args.references if args.references != 124_000 else 1_000_000
    n_queries = args.queries if args.queries != 20_000 else 5_000
    data = args.data or Path(tempfile.mkdtemp(prefix="fa-bench-million-"))
    data.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, FANTASIA_HOME=str(data / "home"))
    env.pop("FANTASIA_DATABASE_URL", None)
    os.environ.update(FANTASIA_HOME=env["FANTASIA_HOME"])
    stamp = f"{n_refs} {n_queries} {args.dim} 0"
    print(f"disk: {shutil.disk_usage(data).free / GIB:.0f} GiB free under {data}")
    if not (data / "inserted").exists() or (data / "inserted").read_text().strip() != stamp:
        from fantasia_assets.db import get_engine, schema_ready

        started = time.perf_counter()
        engine = get_engine()
        schema_ready(engine)
        obo = Path(__file__).resolve().parents[1] / "data" / "sample" / "go-basic.obo.gz"
        million.insert_blocks(engine, data, n_refs, n_queries, args.dim, obo)
        (data / "inserted").write_text(stamp + "\n")
        print(f"database insert (COPY, blocks of {million.BLOCK:,}): {time.perf_counter() - started:.0f} s")
        from fantasia_assets.db.embedded import embedded_server
        from fantasia_assets.db.engine import dispose_engines

        dispose_engines()
        embedded_server().cleanup()
    config = data / "lookup.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "experiment_path": str(data / "experiment"),
                "embeddings_path": str(data / "queries.h5"),
                "limit_per_entry": args.k,
                "lookup": {"use_gpu": False, "screening": args.screening},
                "embedding": {"models": {"Synthetic": {"layer_index": [0]}}},
                "postprocess": {"alignment": False},
            }
        )
    )
    shutil.rmtree(data / "home" / "cache", ignore_errors=True)
    # --full: every run searches everything (a later one would otherwise find the first's state and
    # search nothing), the warm ones from the memory-mapped cache the cold one wrote
    cli = [sys.executable, "-m", "fantasia_assets.cli", "lookup", "--config", str(config), "--full"]
    results = []
    for label in ("cold", "warm", "kept"):
        wall, rss, output = million.run_measured(cli, env)
        print(
            f"--- {label} lookup, {n_queries:,} × {n_refs:,} × {args.dim}: {wall:.1f} s, peak RSS {rss:.2f} GiB"
        )
        print("\n".join(line for line in output.splitlines() if line and not line.startswith("  ")))
        results.append((label, wall, rss))
    if args.loader:
        files = data / f"files-{args.loader}"
        started = time.perf_counter()
        million.generate(
            files, args.loader, 10, args.dim, args.synth, args.synth.parents[1] / "data" / "go-basic.obo.gz"
        )
        print(f"files for load-references ({args.loader:,} refs): {time.perf_counter() - started:.0f} s")
        load_env = dict(env, FANTASIA_HOME=str(files / "home"))
        command = [sys.executable, "-m", "fantasia_assets.cli", "load-references", "--fasta",
                   str(files / "refs.fasta.gz"), "--gaf", str(files / "refs.gaf.gz"), "--obo",
                   str(args.synth.parents[1] / "data" / "go-basic.obo.gz"), "--embeddings",
                   str(files / "refs.h5"), "--model", "Synthetic"]  # fmt: skip
        wall, rss, output = million.run_measured(command, load_env)
        print(output.strip().splitlines()[-2])
        results.append((f"load-references {args.loader:,} refs", wall, rss))
    print()
    for label, wall, rss in results:
        print(f"{label}: {wall:.1f} s, peak_rss_GiB={rss:.2f}  (target <= 6)")


if __name__ == "__main__":
    main()
