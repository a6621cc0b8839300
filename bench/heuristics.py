"""Benchmark: the candidate heuristics for predictions.tsv's score, side by side under cafaeval.

    FANTASIA_HOME=… .venv/bin/python bench/heuristics.py [NAME …]

Reads the raw rows of the mouse lookup (/tmp/sci/mouse/exp: NEAR layers 0, 1, 4, k = 5 against
the shared human references) and the mouse GOA truth, builds each candidate score over the
propagated neighbour annotations and evaluates them all in one cafaeval run. `vote_ri_id_conf`
is what `core.scoring.heuristic_scores` computes.
"""

import glob
import sys
import time

import polars as pl

from fantasia_assets.core import evaluation as ev
from fantasia_assets.core import scoring as sc
from fantasia_assets.core.ontology import read_ontology
from fantasia_assets.db.sources import read_gaf, read_obo

D = "/work/shared/data"
obo = read_obo(D + "/go-basic.obo.gz")
onto = read_ontology(D + "/go-basic.obo.gz")
truth = read_gaf([D + "/goa_mouse.gaf.gz"], obo).kept
refs = read_gaf([D + "/goa_human.gaf.gz"], obo).kept
raw = pl.concat(
    [pl.read_parquet(f) for f in sorted(glob.glob("/tmp/sci/mouse/exp/parquet/NEAR/*/raw_rows.parquet"))],
    how="diagonal_relaxed",
)
queries = raw["accession"].unique().to_list()
truth = ev.truth_table(truth, queries, "goa_mouse")
P = sc.PARTITION
nb = sc.neighbours(raw)
terms = sc.supported_terms(raw, onto)


def vote(w, layers=None, per_aspect=True, conf=None):
    t = nb.with_columns(w.alias("weight"))
    tt = terms
    if layers is not None:
        t = t.filter(pl.col("layer_index").is_in(layers))
        tt = tt.filter(pl.col("layer_index").is_in(layers))
    j = tt.join(t, on=["accession", *P, "ref_idx"])
    npart = t.select(P).unique().height
    if per_aspect:
        tot = (
            j.select("accession", *P, "ref_idx", "aspect", "weight")
            .unique()
            .group_by("accession", *P, "aspect")
            .agg(pl.col("weight").sum().alias("total"), pl.col("weight").max().alias("wmax"))
        )
        keys = ["accession", *P, "aspect"]
    else:
        tot = t.group_by("accession", *P).agg(
            pl.col("weight").sum().alias("total"), pl.col("weight").max().alias("wmax")
        )
        keys = ["accession", *P]
    v = (
        j.group_by("accession", *P, "go_id", "aspect")
        .agg(pl.col("weight").sum())
        .join(tot, on=keys)
        .with_columns((pl.col("weight") / pl.col("total")).alias("vote"))
    )
    if conf:
        v = v.with_columns(pl.col("vote") * pl.col("wmax") ** conf)
    return v.group_by("accession", "go_id").agg((pl.col("vote").sum() / npart).alias("score"))


def k1():
    first = (
        nb.filter(pl.col("layer_index") == 0)
        .sort("accession", "ri", descending=[False, True])
        .group_by("accession", maintain_order=True)
        .first()
    )
    j = terms.join(first.select("accession", *P, "ref_idx", "ri"), on=["accession", *P, "ref_idx"])
    return j.select("accession", "go_id", pl.col("ri").alias("score"))


ri = pl.col("ri")
idn = pl.col("identity")
cands = {
    "k1_copy": k1(),
    "vote_ri_L0": vote(ri, [0]),
    "vote_ri": vote(ri),
    "vote_ri_id": vote(ri * idn),
    "vote_id": vote(idn),
    "vote_ri_id_all": vote(ri * idn, per_aspect=False),
    "vote_ri_id_conf": vote(ri * idn, conf=0.5),
    "vote_ri8_id": vote(ri**8 * idn),
    "vote_ri_id2": vote(ri * idn**2),
}
sel = sys.argv[1:]
if sel:
    cands = {k: v for k, v in cands.items() if k in sel}
t = time.time()
r = ev.evaluate(cands, truth, onto, refs, threads=2)
print("eval", time.time() - t)
pl.Config.set_tbl_rows(100)
m = r.metrics.pivot(on="aspect", index="output", values=["fmax", "smin"])
print(m)
