"""Real proteins for the embedding tests: sequences from the shared FASTA, vectors from its HDF5."""

from __future__ import annotations

import functools
import gzip

import h5py
import numpy as np

from fantasia_assets_tests.conftest import shared_file


@functools.cache
def shared_sequences() -> dict[str, str]:
    sequences: dict[str, list[str]] = {}
    with gzip.open(shared_file("sequences.fasta.gz"), "rt") as handle:
        current: list[str] = []
        for line in handle:
            if line.startswith(">"):
                current = sequences.setdefault(line[1:].split()[0], [])
            else:
                current.append(line.strip())
    return {accession: "".join(parts) for accession, parts in sequences.items()}


def shared_vectors(file: str, accessions: list[str], layer: int) -> np.ndarray:
    with h5py.File(shared_file(file), "r") as h5:
        return np.stack([h5[f"accession_{a}/type_1/layer_{layer}/embedding"][()] for a in accessions])


@functools.cache
def short_references(count: int = 6, longest: int = 250) -> list[str]:
    """The first `count` references (file order) of at most `longest` residues: fast to embed."""
    sequences = shared_sequences()
    with h5py.File(shared_file("reference_human.h5"), "r") as h5:
        names = [name[len("accession_") :] for name in h5]
    return [a for a in names if len(sequences[a]) <= longest][:count]


def one_thread():
    """Run torch on one thread, then restore: on this shared 2-core machine, two OpenMP
    threads competing with other processes' work are ten times slower than one."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
