"""Benchmark: the lookup's stages after the search, in process, on a finished run's neighbours.

    .venv/bin/python bench/poststage.py SOURCE [--repeats 5] [--config CONFIG.yaml]

SOURCE is the `experiment_path` of a finished `fantasia-assets lookup` (its
`parquet/{model}/layer_{k}/neighbour_hits.parquet` are the search's result) under
`$FANTASIA_HOME`, whose caches hold the annotations and reference sequences that run used.
The script times, as the CLI's stage table names them: `transfer` (GO rows of every
partition), `write partition` (raw Parquet, raw CSV shards, per-partition TopGO), `summary`,
`topgo ensemble` and `fasta+mapping` (sequences.fasta, query_index_mapping.csv,
output_names.csv, skipped_queries.csv), each into a fresh folder, `repeats` times in one
process; it prints the first (cold) and the fastest wall time per stage and the least CPU time
(all threads; steadier than wall time on a loaded machine), then checks that every
file written equals SOURCE's byte for byte.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import polars as pl

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

from fantasia_assets import runner  # noqa: E402
from fantasia_assets.config import load_config  # noqa: E402
from fantasia_assets.core import writers  # noqa: E402
from fantasia_assets.core.plan import Partition, open_queries  # noqa: E402
from fantasia_assets.core.stages import build_raw_rows  # noqa: E402

STAGES = ("transfer", "write partition", "summary", "topgo ensemble", "fasta+mapping")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("source", type=Path)
    parser.add_argument("--config", type=Path, help="the run's configuration (default: SOURCE.yaml)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the last output folder")
    args = parser.parse_args()
    source = args.source.resolve()
    config = load_config(args.config or source.with_suffix(".yaml"))
    home = Path(os.environ["FANTASIA_HOME"])
    queries = open_queries(config.embeddings_path, home / "cache" / "queries")
    annotations = pl.read_parquet(
        max((home / "cache" / "annotations").glob("*.parquet"), key=os.path.getmtime)
    )
    stored = pl.read_parquet(max((home / "cache" / "sequences").glob("*.parquet"), key=os.path.getmtime))
    sequence_of = dict(zip(stored["sequence_id"].to_list(), stored["sequence"].to_list(), strict=True))

    def sequences(ids):
        return {int(i): sequence_of[int(i)] for i in set(ids.tolist())}

    settings = runner.raw_row_settings(config)
    specs = {m.name: m for m in runner.model_specs(config)}
    partitions = []
    for hits in sorted((source / "parquet").glob("*/layer_*/neighbour_hits.parquet")):
        model_dir, layer_dir = hits.parent.parent.name, hits.parent.name
        layer = None if layer_dir == "layer_legacy" else int(layer_dir.removeprefix("layer_"))
        model = next(
            m for m in config.enabled_models() if writers.exports.model_dir_name(m.name) == model_dir
        )
        spec = specs[model.name]
        type_id = pl.read_parquet(source / "parquet" / model_dir / layer_dir / "raw_rows.parquet")[
            "embedding_type_id"
        ][0]
        partitions.append((Partition(spec, int(type_id), layer), pl.read_parquet(hits)))
    shard_names = writers.shard_file_names(queries, config.fantasia_compat)
    spill_base = Path(tempfile.mkdtemp(prefix="poststage-"))
    times: dict[str, list[float]] = {stage: [] for stage in STAGES}
    cpu: dict[str, list[float]] = {stage: [] for stage in STAGES}
    out = None
    for repeat in range(args.repeats):
        out = spill_base / f"run{repeat}"
        out.mkdir()
        spent = dict.fromkeys(STAGES, 0.0)
        used = dict.fromkeys(STAGES, 0.0)
        raws = []
        for partition, hits in partitions:
            started, began = time.perf_counter(), time.process_time()
            raw = build_raw_rows(queries, partition, hits, annotations, sequences, settings)
            spent["transfer"] += time.perf_counter() - started
            used["transfer"] += time.process_time() - began
            started, began = time.perf_counter(), time.process_time()
            writers.write_raw(out, partition, raw, shard_names, config.precision, config.fantasia_compat)
            if config.topgo:
                writers.write_partition_topgo(out, partition, raw, config.precision, config.fantasia_compat)
            spent["write partition"] += time.perf_counter() - started
            used["write partition"] += time.process_time() - began
            raws.append(raw.select("ref_idx"))
        plist = [p for p, _ in partitions]
        started, began = time.perf_counter(), time.process_time()
        writers.write_summary(
            out, plist, config.summary, config.limit_per_entry, config.precision,
            spill_base / f"spill{repeat}", config.fantasia_compat,
        )  # fmt: skip
        spent["summary"] += time.perf_counter() - started
        used["summary"] += time.process_time() - began
        if config.topgo:
            started, began = time.perf_counter(), time.process_time()
            writers.write_ensemble(out, plist, config.precision, spill_base / f"spill-e{repeat}")
            spent["topgo ensemble"] += time.perf_counter() - started
            used["topgo ensemble"] += time.process_time() - began
        started, began = time.perf_counter(), time.process_time()
        raw_all = pl.concat(raws)
        references = sequences(raw_all["ref_idx"].to_numpy()) if raw_all.height else {}
        writers.write_sequences(out, queries, references, config.precision)
        writers.write_run_records(out, queries, plist, shard_names)
        spent["fasta+mapping"] += time.perf_counter() - started
        used["fasta+mapping"] += time.process_time() - began
        for stage, seconds in spent.items():
            times[stage].append(seconds)
            cpu[stage].append(used[stage])
        if repeat < args.repeats - 1:
            shutil.rmtree(out)

    print(f"{'stage':<18}{'first':>8}{'best':>8}{'best CPU':>10}")
    for stage in STAGES:
        print(f"{stage:<18}{times[stage][0]:8.3f}{min(times[stage]):8.3f}{min(cpu[stage]):10.3f}")
    first, best = sum(t[0] for t in times.values()), sum(min(t) for t in times.values())
    print(f"{'sum':<18}{first:8.3f}{best:8.3f}{sum(min(t) for t in cpu.values()):10.3f}")

    compared, differing = 0, []
    for path in sorted(out.rglob("*")):
        if path.is_dir() or (path.suffix == ".parquet" and path.name != "raw_rows.parquet"):
            continue
        relative = path.relative_to(out)
        compared += 1
        if not filecmp.cmp(path, source / relative, shallow=False):
            differing.append(str(relative))
    print(f"compared {compared} files with {source}: {len(differing)} differ {differing[:10]}")
    if not args.keep:
        shutil.rmtree(spill_base)
    else:
        print(f"kept {out}")
    sys.exit(1 if differing else 0)


if __name__ == "__main__":
    main()
