"""Cut the bundled sample (data/sample/) out of the shared real data set.

    python scripts/make_sample.py --shared ../shared/data --out data/sample

Picks 50 mouse queries that carry both models (NEAR type_1, AntiBERTy type_2) and 300 human
references that carry both too: the 3 nearest references of every query by NEAR layer-0
cosine distance (so the demo finds real homologues), then seeded random ones. Writes their
sequences, every GOA line of the references (non-experimental ones too, so the loader's
filters have work), a GO ontology trimmed to the terms used and their is_a ancestors, the
embeddings in FANTASIA's HDF5 layout, and the queries' sequences as a FASTA.
"""

from __future__ import annotations

import argparse
import gzip
import io
import re
from pathlib import Path

import h5py
import numpy as np

N_QUERIES = 50
N_REFERENCES = 300
NEIGHBOURS_PER_QUERY = 3
SEED = 0


def _gzip_text(path: Path):
    """A gzip text writer with a fixed header time, so re-cutting gives identical bytes."""
    return io.TextIOWrapper(gzip.GzipFile(path, "wb", compresslevel=9, mtime=0), encoding="utf-8")


def _vectors(handle: h5py.File, accessions: list[str], path: str) -> np.ndarray:
    return np.stack([handle[f"accession_{a}/{path}"][()] for a in accessions]).astype(np.float64)


def _copy_groups(source: Path, target: Path, accessions: list[str], types: list[str]) -> None:
    with h5py.File(source, "r") as src, h5py.File(target, "w") as dst:
        for key, value in src.attrs.items():
            if key not in ("truncated_accessions", "n_proteins"):
                dst.attrs[key] = value
        dst.attrs["n_proteins"] = len(accessions)
        dst.attrs["subset"] = f"fantasia-assets sample cut by scripts/make_sample.py (seed {SEED})"
        # datasets are re-created rather than copied with H5Ocopy, whose output HDF5 2.0 can't read back
        for accession in accessions:
            source_group = src[f"accession_{accession}"]
            group = dst.create_group(f"accession_{accession}")
            sequence = source_group["sequence"][()].decode("utf-8")
            group.create_dataset("sequence", data=sequence, dtype=h5py.string_dtype())
            for type_name in types:
                for layer, layer_group in source_group[type_name].items():
                    vector = layer_group["embedding"][()]
                    group.create_dataset(f"{type_name}/{layer}/embedding", data=vector, dtype=vector.dtype)


def _trim_obo(source: Path, target: Path, wanted: set[str]) -> int:
    text = gzip.open(source, "rt", encoding="utf-8").read()
    header, *stanzas = re.split(r"\n(?=\[(?:Term|Typedef)\])", text)
    terms: dict[str, str] = {}
    alt: dict[str, str] = {}
    typedefs = []
    for stanza in stanzas:
        if stanza.startswith("[Typedef]"):
            typedefs.append(stanza)
            continue
        term_id = re.search(r"^id: (GO:\d+)", stanza, re.M).group(1)
        terms[term_id] = stanza
        for other in re.findall(r"^alt_id: (GO:\d+)", stanza, re.M):
            alt[other] = term_id
    keep: set[str] = set()
    todo = [alt.get(t, t) for t in wanted if alt.get(t, t) in terms]
    while todo:
        term = todo.pop()
        if term in keep:
            continue
        keep.add(term)
        todo.extend(re.findall(r"^is_a: (GO:\d+)", terms[term], re.M))
    body = "\n".join(
        [header.rstrip("\n") + "\n"] + [terms[t].rstrip("\n") + "\n" for t in sorted(keep)] + typedefs
    )
    with _gzip_text(target) as out:
        out.write(body)
    return len(keep)


def _write_fasta(shared: Path, wanted: set[str], target: Path) -> None:
    """The records of `wanted` accessions of the shared FASTA, as they are there, in its order."""
    fasta_out = []
    with gzip.open(shared / "sequences.fasta.gz", "rt") as handle:
        keep = False
        for line in handle:
            if line.startswith(">"):
                keep = line[1:].split()[0] in wanted
            if keep:
                fasta_out.append(line)
    with _gzip_text(target) as handle:
        handle.writelines(fasta_out)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shared", type=Path, default=Path("../shared/data"), help="the shared real data folder"
    )
    parser.add_argument("--out", type=Path, default=Path("data/sample"), help="where to write the sample")
    args = parser.parse_args()
    shared, out = args.shared, args.out
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(SEED)

    with h5py.File(shared / "queries_mouse_two_models.h5", "r") as handle:
        all_queries = sorted(k[len("accession_") :] for k in handle)
        queries = sorted(rng.choice(all_queries, N_QUERIES, replace=False).tolist())
        query_vectors = _vectors(handle, queries, "type_1/layer_0/embedding")
    with h5py.File(shared / "reference_human_antiberty.h5", "r") as handle:
        candidates = sorted(k[len("accession_") :] for k in handle)
    with h5py.File(shared / "reference_human.h5", "r") as handle:
        candidate_vectors = _vectors(handle, candidates, "type_1/layer_0/embedding")

    q = query_vectors / np.linalg.norm(query_vectors, axis=1, keepdims=True)
    r = candidate_vectors / np.linalg.norm(candidate_vectors, axis=1, keepdims=True)
    nearest = np.argsort(1.0 - q @ r.T, axis=1, kind="stable")[:, :NEIGHBOURS_PER_QUERY]
    chosen = set(nearest.ravel().tolist())
    rest = [i for i in range(len(candidates)) if i not in chosen]
    chosen.update(rng.choice(rest, N_REFERENCES - len(chosen), replace=False).tolist())
    references = sorted(candidates[i] for i in chosen)

    wanted = set(references)
    _write_fasta(shared, wanted, out / "references.fasta.gz")
    # the queries as a proteome FASTA too: `make demo` embeds them itself (fantasia-assets embed)
    _write_fasta(shared, set(queries), out / "queries.fasta.gz")

    gaf_out, go_ids = [], set()
    with gzip.open(shared / "goa_human.gaf.gz", "rt") as handle:
        for line in handle:
            if line.startswith("!"):
                if line.startswith("!gaf-version") or line.startswith("!generated"):
                    gaf_out.append(line)
                continue
            fields = line.split("\t")
            if fields[1] in wanted:
                gaf_out.append(line)
                go_ids.add(fields[4])
    with _gzip_text(out / "references.gaf.gz") as handle:
        handle.writelines(gaf_out)

    n_terms = _trim_obo(shared / "go-basic.obo.gz", out / "go-basic.obo.gz", go_ids)
    _copy_groups(shared / "reference_human.h5", out / "references_near.h5", references, ["type_1"])
    _copy_groups(
        shared / "reference_human_antiberty.h5", out / "references_antiberty.h5", references, ["type_2"]
    )
    _copy_groups(shared / "queries_mouse_two_models.h5", out / "queries.h5", queries, ["type_1", "type_2"])
    print(
        f"{len(queries)} queries, {len(references)} references, {len(gaf_out)} GAF lines, "
        f"{n_terms} GO terms -> {out}"
    )


if __name__ == "__main__":
    main()
