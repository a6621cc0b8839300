"""The million-reference case of `bench/scale.py`: synthetic data made in blocks, then the
project's own loader and lookup, each in a child process whose peak RSS the kernel reports.

Data follow `../shared/tools/synth_scale.py` (references: noisy members of 2,000 families;
queries: perturbed references; five GO terms per family from the shared ontology) but are
made block by block, so a million 1,024-dim references cost one block (≈ 200 MiB) rather than
synth_scale's 12 GB. Two ways in:

- `generate`: files for `load-references` (refs.h5 in FANTASIA's layout, refs.fasta.gz,
  refs.gaf.gz) and queries.h5, kept under --data (`done` marks a finished set). Writing a
  million HDF5 groups takes ~45 min on the loaded 2-core machine, and loading them as long.
- `insert_blocks`: the references straight into the database with COPY, block by block (short
  sequences, the sample ontology's GO ids), plus queries.h5: what the lookup side needs.
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

AMINO = np.frombuffer(b"ACDEFGHIKLMNPQRSTVWY", dtype=np.uint8)
FAMILIES = 2000
BLOCK = 50_000
GIB = 2**30


def _go_terms(synth: Path, obo: Path) -> dict[str, np.ndarray]:
    spec = importlib.util.spec_from_file_location("synth_scale", synth)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.go_terms(str(obo))


def write_queries(path: Path, queries: np.ndarray) -> None:
    """The queries (noisy copies of references) in FANTASIA's HDF5 layout, NEAR-like type 1, layer 0."""
    with h5py.File(path, "w", libver=("v108", "v108")) as h5:
        for i, vector in enumerate(queries):
            group = h5.create_group(f"accession_QRY{i:07d}")
            group.create_dataset("sequence", data="M" * 100, dtype=h5py.string_dtype("utf-8"))
            group.create_dataset("type_1/layer_0/embedding", data=vector)


def generate(out: Path, n_refs: int, n_queries: int, dim: int, synth: Path, obo: Path, seed: int = 0) -> None:
    """Write the data set into `out` (skipped when a finished one is there)."""
    stamp = f"{n_refs} {n_queries} {dim} {seed}"
    if (out / "done").exists() and (out / "done").read_text().strip() == stamp:
        return
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((FAMILIES, dim), dtype=np.float32)
    family = rng.integers(0, FAMILIES, n_refs)
    terms = _go_terms(synth, obo)
    family_terms = [
        [(aspect, str(rng.choice(terms[aspect]))) for aspect in rng.choice(list("PFC"), 5)]
        for _ in range(FAMILIES)
    ]
    picked = np.sort(rng.integers(0, n_refs, n_queries))
    sources = np.empty((n_queries, dim), dtype=np.float32)
    with (
        h5py.File(out / "refs.h5", "w", libver=("v108", "v108")) as h5,
        gzip.open(out / "refs.fasta.gz", "wt", compresslevel=1) as fasta,
        gzip.open(out / "refs.gaf.gz", "wt", compresslevel=1) as gaf,
    ):
        h5.attrs["model_name"] = "synthetic"
        h5.attrs["embedding_type_id"] = 1
        gaf.write("!gaf-version: 2.1\n")
        for start in range(0, n_refs, BLOCK):
            stop = min(start + BLOCK, n_refs)
            fam = family[start:stop]
            vectors = centres[fam] + 0.6 * rng.standard_normal((stop - start, dim), dtype=np.float32)
            lengths = np.clip(rng.lognormal(6.0, 0.5, stop - start).astype(int), 30, 3000)
            for offset in range(stop - start):
                i = start + offset
                accession = f"SYN{i:07d}"
                sequence = AMINO[rng.integers(0, 20, lengths[offset])].tobytes().decode()
                group = h5.create_group(f"accession_{accession}")
                group.create_dataset("sequence", data=sequence, dtype=h5py.string_dtype("utf-8"))
                group.create_dataset("type_1/layer_0/embedding", data=vectors[offset])
                fasta.write(f">{accession}\n{sequence}\n")
                for aspect, go in family_terms[fam[offset]]:
                    gaf.write(
                        f"UniProtKB\t{accession}\tG{accession}\t\t{go}\tPMID:1\tIDA\t\t{aspect}\tsynthetic"
                        "\t\tprotein\ttaxon:9606\t20190101\tSYN\t\t\n"
                    )
            inside = np.flatnonzero((picked >= start) & (picked < stop))
            sources[inside] = vectors[picked[inside] - start]
            print(f"  generated {stop:,}/{n_refs:,} references", flush=True)
    write_queries(out / "queries.h5", sources + 0.3 * rng.standard_normal(sources.shape, dtype=np.float32))
    (out / "done").write_text(stamp + "\n")


def run_measured(command: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS GiB, output) of a child process; the RSS is the kernel's ru_maxrss."""
    started = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        sys.stdout.write(output)
        raise SystemExit(f"{command[:3]} failed with exit status {child.returncode}")
    return wall, usage.ru_maxrss * 1024 / GIB, output


def insert_blocks(engine, out: Path, n_refs: int, n_queries: int, dim: int, obo: Path, seed: int = 0) -> None:
    """References straight into the database (COPY, blocks of BLOCK), queries into out/queries.h5."""
    from fantasia_assets.db import halfvec
    from fantasia_assets.db.loader import load_references

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((FAMILIES, dim), dtype=np.float32)
    load_references(engine, obo=obo)
    with engine.connect() as conn:
        go_ids = [row[0] for row in conn.exec_driver_sql("SELECT go_id FROM go_terms ORDER BY go_id")]
    family_terms = rng.integers(0, len(go_ids), (FAMILIES, 5))
    picked = np.sort(rng.integers(0, n_refs, n_queries))
    sources = np.empty((n_queries, dim), dtype=np.float32)
    with engine.begin() as conn:
        conn.exec_driver_sql("INSERT INTO sequence_embedding_type (id, name) VALUES (1, 'Synthetic')")
    for start in range(0, n_refs, BLOCK):
        stop = min(start + BLOCK, n_refs)
        family = rng.integers(0, FAMILIES, stop - start)
        vectors = centres[family] + 0.6 * rng.standard_normal((stop - start, dim), dtype=np.float32)
        letters = AMINO[rng.integers(0, 20, (stop - start, 60))]
        with engine.begin() as conn:
            cursor = conn.connection.driver_connection.cursor()
            with cursor.copy("COPY sequence (id, sequence, sequence_hash) FROM STDIN") as copy:
                for offset in range(stop - start):
                    sequence = letters[offset].tobytes().decode()
                    copy.write_row((start + offset + 1, sequence, f"{start + offset + 1:032x}"))
            with cursor.copy(
                "COPY protein (id, sequence_id, gene_name, organism, taxonomy_id) FROM STDIN"
            ) as copy:
                for i in range(start + 1, stop + 1):
                    copy.write_row((f"P{i:07d}", i, f"G{i}", "Homo sapiens", "9606"))
            with cursor.copy(
                "COPY protein_go_term_annotation (protein_id, go_id, evidence_code) FROM STDIN"
            ) as copy:
                for offset in range(stop - start):
                    for go in sorted(set(family_terms[family[offset]].tolist())):
                        copy.write_row((f"P{start + offset + 1:07d}", go_ids[go], "EXP"))
            cursor.execute("CREATE TEMP TABLE _e (sequence_id int4, embedding halfvec) ON COMMIT DROP")
            with cursor.copy("COPY _e FROM STDIN (FORMAT binary)") as copy:
                copy.write(halfvec.encode(np.arange(start + 1, stop + 1), vectors.astype(np.float16)))
            cursor.execute(
                "INSERT INTO sequence_embeddings (sequence_id, embedding_type_id, layer_index, embedding, shape) "
                "SELECT sequence_id, 1, 0, embedding, ARRAY[%s] FROM _e",
                (dim,),
            )
        inside = np.flatnonzero((picked >= start) & (picked < stop))
        sources[inside] = vectors[picked[inside] - start]
        print(f"  inserted {stop:,}/{n_refs:,} references", flush=True)
    write_queries(out / "queries.h5", sources + 0.3 * rng.standard_normal(sources.shape, dtype=np.float32))
