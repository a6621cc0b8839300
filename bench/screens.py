"""Benchmark: which screening arithmetic searches real embeddings fastest, run by hand (not by CI).

The engine's screens (`fantasia_assets.core.screen`) all return the float64 oracle's neighbours;
they differ in speed, and by the data: a 16-bit or 8-bit screen multiplies faster but its wider
error window holds more candidates, which dense neighbourhoods fill by the hundred. This times
the built engine's search of the shared real sets (`../shared/data`: 1,500 mouse queries
against 13,000 human references, NEAR layers 0 and 1, 256-d; 500 queries against 3,000
references for each AntiBERTy layer, 512-d), cosine, k = 5, with each screening pinned and with
``auto`` (which hands dense query blocks to float32, `SearchEngine._dense_limit`), interleaved,
medians of ``--repeats``; then checks that every screening gave the same neighbours::

    .venv/bin/python bench/screens.py [--repeats 5] [--threads N]

Each line: set, shape, seconds per screening, the fastest, and what auto screened in.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from fantasia_assets.core import screen
from fantasia_assets.core.knn import SearchEngine

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def embeddings(path: Path, kind: str) -> dict[str, np.ndarray]:
    """Layer name → (rows, dim) float32 of every accession of `path` that has model `kind`."""
    rows: dict[str, list[np.ndarray]] = {}
    with h5py.File(path) as handle:
        for name in sorted(handle):
            if kind in handle[name]:
                for layer, group in handle[name][kind].items():
                    rows.setdefault(layer, []).append(group["embedding"][()].ravel())
    return {layer: np.stack(values).astype(np.float32) for layer, values in rows.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed searches per screening; medians")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data", type=Path, default=DATA, help="the shared data folder")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    screenings = ["auto", "fp32"]
    if screen.cpu_has_bf16_units():
        screenings.insert(1, "bf16")
    if screen.int8_sums_exactly():
        screenings.insert(-1, "int8")
    sets = []
    near_q = embeddings(args.data / "queries_mouse.h5", "type_1")
    near_r = embeddings(args.data / "reference_human.h5", "type_1")
    sets += [(f"NEAR {layer}", near_q[layer], near_r[layer]) for layer in sorted(near_r) if layer in near_q]
    anti_q = embeddings(args.data / "queries_mouse_two_models.h5", "type_2")
    anti_r = embeddings(args.data / "reference_human_antiberty.h5", "type_2")
    sets += [
        (f"AntiBERTy {layer}", anti_q[layer], anti_r[layer]) for layer in sorted(anti_r) if layer in anti_q
    ]
    print(f"torch threads {torch.get_num_threads()}; screenings {', '.join(screenings)}; k = 5, cosine")
    for name, queries, references in sets:
        engines = {
            s: SearchEngine("cosine", "torch", "cpu", screening=s).build(references) for s in screenings
        }
        answers = {s: engine.search(queries, 5) for s, engine in engines.items()}  # kernels made
        times: dict[str, list[float]] = {s: [] for s in screenings}
        for _ in range(args.repeats):
            for s, engine in engines.items():
                started = time.perf_counter()
                engine.search(queries, 5)
                times[s].append(time.perf_counter() - started)
        median = {s: statistics.median(values) for s, values in times.items()}
        same = all(
            np.array_equal(answers[s][0], answers["fp32"][0])
            and np.array_equal(answers[s][1], answers["fp32"][1])
            for s in screenings
        )
        figures = "  ".join(f"{s} {median[s]:.3f} s" for s in screenings)
        fastest = min((s for s in screenings if s != "auto"), key=median.get)
        print(
            f"{name}: {len(queries):,} × {len(references):,} × {references.shape[1]}  {figures}  "
            f"fastest pinned {fastest}; auto/fastest {median['auto'] / median[fastest]:.2f}; "
            f"auto screens in {engines['auto'].screening}; same neighbours {same}"
        )


if __name__ == "__main__":
    main()
