"""Cut the demo's evaluation inputs out of the shared real data set.

    python scripts/make_truth_slice.py --shared ../shared/data --out data/sample

Writes `queries_truth.gaf.gz`, every mouse GOA line of the sample queries (the evaluation's
truth; the loader's filter picks the experimental ones), and `go-evaluation.obo.gz`, the GO
ontology trimmed to the terms that the sample references and queries carry plus all their
is_a and part_of ancestors, with only those two relations (the sample's go-basic.obo.gz
keeps is_a ancestors only).
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import h5py


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared" / "data"
    )
    parser.add_argument("--out", type=Path, default=Path("data/sample"))
    args = parser.parse_args()
    with h5py.File(args.out / "queries.h5", "r") as handle:
        queries = {name.removeprefix("accession_") for name in handle}
    truth = []
    with gzip.open(args.shared / "goa_mouse.gaf.gz", "rt") as gaf:
        for line in gaf:
            if line.startswith("!"):
                if line.startswith("!gaf-version"):
                    truth.append(line)
            elif line.split("\t", 2)[1] in queries:
                truth.append(line)
    with gzip.open(args.out / "queries_truth.gaf.gz", "wt", compresslevel=9) as out:
        out.writelines(truth)
    used = {line.split("\t")[4] for line in truth if not line.startswith("!")}
    with gzip.open(args.out / "references.gaf.gz", "rt") as gaf:
        used |= {line.split("\t")[4] for line in gaf if not line.startswith("!")}
    stanzas, header = {}, []
    with gzip.open(args.shared / "go-basic.obo.gz", "rt") as obo:
        text = obo.read()
    head, *blocks = text.split("\n[")
    header = head.rstrip("\n")
    for block in blocks:
        lines = block.rstrip("\n").split("\n")
        if lines[0] != "Term]":
            continue
        ids = [line[4:] for line in lines if line.startswith("id: ")]
        ids += [line[8:] for line in lines if line.startswith("alt_id: ")]
        parents = [line[6:16] for line in lines if line.startswith("is_a: ")]
        parents += [line.split()[2] for line in lines if line.startswith("relationship: part_of ")]
        # other relations (regulates, has_part, …) may name terms left out: dropped
        kept = [
            ln
            for ln in lines
            if not ln.startswith("relationship: ") or ln.startswith("relationship: part_of ")
        ]
        stanzas[ids[0]] = ("[" + "\n".join(kept), parents, ids)
    alias = {alt: primary for primary, (_, _, ids) in stanzas.items() for alt in ids}
    keep, stack = set(), [alias[t] for t in used if t in alias]
    while stack:
        term = stack.pop()
        if term not in keep:
            keep.add(term)
            stack.extend(p for p in stanzas[term][1] if p in stanzas)
    with gzip.open(args.out / "go-evaluation.obo.gz", "wt", compresslevel=9) as out:
        out.write(header + "\n\n" + "\n\n".join(stanzas[t][0] for t in sorted(keep)) + "\n")
    print(f"{len(truth):,} GAF lines of {len(queries)} queries; ontology of {len(keep):,} terms")


if __name__ == "__main__":
    main()
