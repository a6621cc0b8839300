"""The GO graph for scoring and evaluation: is_a + part_of ancestors, propagation, information accretion.

Read with goatools. Edges are is_a and part_of between terms of the same namespace, as the CAFA
evaluator (cafaeval) builds its graphs, so a score propagated here and a score propagated by
the evaluator agree.
"""

from __future__ import annotations

import gzip
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import polars as pl

from fantasia_assets.errors import FantasiaError

from . import scratch

ASPECTS = {"biological_process": "P", "molecular_function": "F", "cellular_component": "C"}


class OntologyError(FantasiaError, ValueError):
    """The ontology file cannot be read or a GO id is not in it."""


def plain_obo(path: Path, directory: Path) -> Path:
    """`path` itself when it is a plain OBO, else its gunzipped copy in `directory` (goatools and
    cafaeval read only plain files)."""
    path = Path(path)
    with open(path, "rb") as handle:
        gzipped = handle.read(2) == b"\x1f\x8b"
    if not gzipped:
        return path
    target = Path(directory) / (path.name.removesuffix(".gz") or "ontology.obo")
    with gzip.open(path, "rb") as source, open(target, "wb") as out:
        shutil.copyfileobj(source, out)
    return target


@dataclass(frozen=True)
class GeneOntology:
    """Live GO terms: aspect (P/F/C), same-namespace is_a/part_of parents, alt id → primary id."""

    aspect: dict[str, str]
    parents: dict[str, tuple[str, ...]]
    primary: dict[str, str]  # every known id of a live term (primary or alt) → primary id
    source: Path
    version: str | None = None

    @cached_property
    def roots(self) -> frozenset[str]:
        return frozenset(t for t, ps in self.parents.items() if not ps)

    @cached_property
    def closure(self) -> pl.DataFrame:
        """(go_id, ancestor) for every live term and each of its ancestors, itself included."""
        ancestors: dict[str, frozenset[str]] = {}
        for term in sorted(self.parents):
            stack = [term]
            while stack:
                top = stack[-1]
                if top in ancestors:
                    stack.pop()
                    continue
                pending = [p for p in self.parents[top] if p not in ancestors]
                if pending:
                    stack.extend(pending)
                    continue
                stack.pop()
                ancestors[top] = frozenset({top}).union(*(ancestors[p] for p in self.parents[top]))
        terms = sorted(ancestors)
        return pl.DataFrame(
            {
                "go_id": [t for t in terms for _ in ancestors[t]],
                "ancestor": [a for t in terms for a in sorted(ancestors[t])],
            },
            schema={"go_id": pl.String, "ancestor": pl.String},
        )

    def obo_subset(self, terms: set[str]) -> str:
        """OBO text of `terms` and all their ancestors, with their is_a/part_of edges.

        For the evaluator: a term that neither truth nor any prediction reaches has a zero column
        in both, so leaving it out changes no metric, and the evaluator's dense graph shrinks
        from ~28k terms to the few thousand in use.
        """
        wanted = set(self.closure.filter(pl.col("go_id").is_in(list(terms)))["ancestor"].to_list())
        namespaces = {a: n for n, a in ASPECTS.items()}
        lines = ["format-version: 1.2", ""]
        for term in sorted(wanted):
            lines += ["[Term]", f"id: {term}", f"name: {term}", f"namespace: {namespaces[self.aspect[term]]}"]
            lines += [f"is_a: {parent}" for parent in self.parents[term]]
            lines.append("")
        return "\n".join(lines)

    def map_ids(self, frame: pl.DataFrame, what: str) -> tuple[pl.DataFrame, list[str]]:
        """Map `go_id` to live primary ids; rows with ids not in the ontology are dropped and
        their ids returned (sorted) so the caller can report them, naming `what`."""
        mapped = frame.with_columns(
            pl.col("go_id").replace_strict(self.primary, default=None, return_dtype=pl.String).alias("_live")
        )
        unknown = sorted(set(mapped.filter(pl.col("_live").is_null())["go_id"].to_list()))
        kept = mapped.filter(pl.col("_live").is_not_null()).with_columns(pl.col("_live").alias("go_id"))
        return kept.drop("_live"), unknown

    def propagate_max(self, scores: pl.DataFrame, keys: list[str], roots: bool = False) -> pl.DataFrame:
        """Each row (keys…, go_id, score) lifted to every ancestor of its term; a term keeps the
        best score among itself and its descendants, so no term scores below a descendant.

        Output: keys…, go_id, aspect, score sorted by keys then go_id; roots dropped unless `roots`.
        """
        lifted = (
            scores.lazy()
            .join(self.closure.lazy(), on="go_id", how="inner")
            .group_by(*keys, "ancestor")
            .agg(pl.col("score").max())
            .rename({"ancestor": "go_id"})
        )
        if not roots:
            lifted = lifted.filter(~pl.col("go_id").is_in(list(self.roots)))
        aspects = pl.DataFrame(
            {"go_id": list(self.aspect), "aspect": list(self.aspect.values())},
            schema={"go_id": pl.String, "aspect": pl.String},
        )
        return (
            lifted.join(aspects.lazy(), on="go_id", how="left")
            .select(*keys, "go_id", "aspect", "score")
            .sort(*keys, "go_id")
            .collect()
        )

    def propagate_terms(self, annotations: pl.DataFrame, key: str) -> pl.DataFrame:
        """(key, go_id) annotations closed under ancestors (roots included), unique, sorted."""
        return (
            annotations.lazy()
            .select(key, "go_id")
            .join(self.closure.lazy(), on="go_id", how="inner")
            .select(key, pl.col("ancestor").alias("go_id"))
            .unique()
            .sort(key, "go_id")
            .collect()
        )

    def information_accretion(self, annotations: pl.DataFrame, key: str = "protein_id") -> pl.DataFrame:
        """IA(t) = −log2 P(t | all parents of t), estimated over the proteins of `annotations`
        (propagated first): the proteins carrying t over those carrying every parent of t.

        Clark & Radivojac (2013); the weights of CAFA's weighted Fmax. Columns go_id, ia, sorted;
        only terms some protein carries. Roots have IA 0.
        """
        closed = self.propagate_terms(annotations, key)
        proteins = closed[key].unique().sort()
        index = dict(zip(proteins.to_list(), range(len(proteins)), strict=True))
        carriers = {
            go_id: np.sort(np.fromiter((index[p] for p in members), dtype=np.int64))
            for go_id, members in closed.group_by("go_id").agg(pl.col(key)).iter_rows()
        }
        rows = []
        for go_id in sorted(carriers):
            parents = self.parents[go_id]
            if parents:
                with_parents = carriers[parents[0]]
                for parent in parents[1:]:
                    with_parents = np.intersect1d(with_parents, carriers[parent], assume_unique=True)
                ia = -np.log2(len(carriers[go_id]) / len(with_parents))
            else:
                ia = 0.0
            rows.append((go_id, float(ia) + 0.0))
        return pl.DataFrame(rows, schema={"go_id": pl.String, "ia": pl.Float64}, orient="row")


def read_ontology(path: str | Path) -> GeneOntology:
    """Parse a GO OBO (plain or gzip) with goatools, keeping is_a and part_of relations."""
    from goatools.obo_parser import GODag

    path = Path(path)
    if not path.is_file():
        raise OntologyError(f"{path}: ontology file not found")
    with scratch.folder("obo") as tmp:
        plain = plain_obo(path, Path(tmp))
        try:
            with open(os.devnull, "w") as quiet:
                dag = GODag(str(plain), optional_attrs={"relationship"}, load_obsolete=True, prt=quiet)
        except KeyError as exc:  # a relation to a term no stanza defines
            raise OntologyError(
                f"{path}: malformed OBO: a relation names {exc.args[0] if exc.args else exc}, which no "
                "[Term] of the file defines (a cut-down GO file? use a whole release, e.g. go-basic.obo)"
            ) from exc
        except Exception as exc:  # goatools raises bare Exceptions on malformed stanzas
            raise OntologyError(f"{path}: malformed OBO ({exc})") from exc
        with open(plain, encoding="utf-8", errors="replace") as handle:
            header = handle.read(4096).splitlines()
    version = next(
        (line.split(":", 1)[1].strip() for line in header if line.startswith("data-version:")), None
    )
    aspect: dict[str, str] = {}
    parents: dict[str, tuple[str, ...]] = {}
    primary: dict[str, str] = {}
    for go_id, term in dag.items():
        if term.is_obsolete or term.namespace not in ASPECTS:
            continue
        primary[go_id] = term.item_id
        if term.item_id in aspect:
            continue
        aspect[term.item_id] = ASPECTS[term.namespace]
        related = set(term._parents) | {p.item_id for p in term.relationship.get("part_of", ())}
        parents[term.item_id] = tuple(sorted(related))
    for term, ps in parents.items():
        # cafaeval drops edges to other namespaces and to obsolete terms; so do we
        parents[term] = tuple(p for p in ps if aspect.get(p) == aspect[term])
    if not aspect:
        raise OntologyError(f"{path}: no live GO terms")
    return GeneOntology(aspect=aspect, parents=parents, primary=primary, source=path, version=version)
