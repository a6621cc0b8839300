"""Benchmark: every output of a finished lookup scored by cafaeval, and the learned scorer on held-out halves.

    FANTASIA_HOME=… .venv/bin/python bench/evaluate.py --config CFG --truth goa_mouse.gaf.gz \\
        --obo go-basic.obo.gz [--out DIR] [--skip-full]

1. All outputs (predictions by the heuristic, each TopGO, the ensemble, each summary
   final_score) against the truth of every query: Fmax, Smin, weighted Fmax per aspect.
2. The learned scorer trained on one half of the truth proteins and evaluated on the other,
   the halves split at random by protein, then by MMseqs2 cluster at 30 % identity (so that
   close homologs do not straddle the split); beside it, the heuristic and
   every other output on the same half.
Reference annotations (for IA and term frequencies) come from the database the lookup used.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl


def halves_by_protein(proteins: list[str], seed: int = 0) -> tuple[set[str], set[str]]:
    order = np.random.default_rng(seed).permutation(len(proteins))
    first = {proteins[i] for i in order[: len(proteins) // 2]}
    return first, set(proteins) - first


def halves_by_cluster(experiment: Path, proteins: list[str], seed: int = 0) -> tuple[set[str], set[str]]:
    from fantasia_assets.core.redundancy import cluster_sequences
    from fantasia_assets.db.sources import read_fasta

    fasta = read_fasta(experiment / "sequences.fasta").filter(pl.col("accession").str.starts_with("Q"))
    mapping = pl.read_csv(experiment / "query_index_mapping.csv", infer_schema_length=0)
    members = mapping.select(
        ("Q" + pl.col("query_idx")).alias("accession"), pl.col("accessions").str.split("|").alias("protein")
    ).explode("protein")
    with tempfile.TemporaryDirectory() as tmp:
        clusters = cluster_sequences(dict(fasta.rows()), 0.3, 0.8, 2, Path(tmp))
    cluster_of = dict(
        members.with_columns(pl.col("accession").replace_strict(clusters))
        .select("protein", "accession")
        .rows()
    )
    names = sorted({cluster_of[p] for p in proteins})
    order = np.random.default_rng(seed).permutation(len(names))
    first_clusters = {names[i] for i in order[: len(names) // 2]}
    first = {p for p in proteins if cluster_of[p] in first_clusters}
    print(f"MMseqs2 30 % identity: {len(names):,} clusters over {len(proteins):,} truth proteins")
    return first, set(proteins) - first


def table(metrics: pl.DataFrame, title: str) -> None:
    from fantasia_assets.cli_science import metrics_table

    print(f"\n### {title}")
    for line in metrics_table(metrics):
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--truth", type=Path, action="append", required=True)
    parser.add_argument("--obo", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=None, help="where metrics TSVs and the PNG go")
    parser.add_argument("--skip-full", action="store_true", help="only the held-out halves")
    parser.add_argument(
        "--split", action="append", choices=["protein", "mmseqs2-30%", "none"], default=None,
        help="held-out halves to run (default both; repeatable; none: only the whole set)",
    )  # fmt: skip
    parser.add_argument(
        "--only", action="append", default=None, help="evaluate only these outputs (repeatable)"
    )
    args = parser.parse_args()

    from fantasia_assets import science as cs
    from fantasia_assets.config import load_config
    from fantasia_assets.core import scorer
    from fantasia_assets.core.evaluation import evaluate, experiment_outputs, truth_table, write_evaluation
    from fantasia_assets.core.ontology import read_ontology
    from fantasia_assets.core.scoring import heuristic_scores

    config = load_config(args.config)
    out = args.out or config.experiment_path / "bench_evaluation"
    ontology = read_ontology(args.obo)
    raw, run = cs.lookup_rows(config)  # run: every (model, layer), those without neighbours too
    truth = truth_table(
        cs.read_truth(args.truth, args.obo, None), raw["accession"].unique().to_list(), "truth"
    )
    references = cs.reference_annotations()
    outputs = experiment_outputs(config.experiment_path)
    outputs["predictions"] = heuristic_scores(raw, ontology, run).select("accession", "go_id", "score")
    if args.only:
        outputs = {k: v for k, v in outputs.items() if k in args.only}

    proteins = sorted(truth["accession"].unique().to_list())
    splits = {
        "protein": lambda: halves_by_protein(proteins),
        "mmseqs2-30%": lambda: halves_by_cluster(config.experiment_path, proteins),
    }
    for split in [s for s in args.split or list(splits) if s != "none"]:
        train, test = splits[split]()
        raw_train = raw.filter(pl.col("accession").is_in(list(train)))
        truth_train = truth.filter(pl.col("accession").is_in(list(train)))
        frame, y, partitions, terms = cs.training_set(raw_train, truth_train, ontology, references, run)
        model = scorer.fit(frame, y, partitions, terms, {"bench": split}, per_aspect=config.per_aspect)
        raw_test = raw.filter(pl.col("accession").is_in(list(test)))
        held = {
            "learned": model.predict(raw_test, ontology, config.per_aspect, run).select("accession", "go_id", "score"),
            **{k: v.filter(pl.col("accession").is_in(list(test))) for k, v in outputs.items()},
        }  # fmt: skip
        result = evaluate(
            held, truth.filter(pl.col("accession").is_in(list(test))), ontology, references, threads=2
        )
        write_evaluation(out / split, result, 4)
        table(
            result.metrics,
            f"split by {split}: trained on {len(train):,} proteins ({len(y):,} candidates, out-of-fold AUC "
            f"{model.cross_validation['auc_out_of_fold']:.3f}), evaluated on {len(test):,}",
        )
    if not args.skip_full:
        started = time.perf_counter()
        result = evaluate(outputs, truth, ontology, references, threads=2)
        write_evaluation(out / "all", result, 4)
        table(
            result.metrics,
            f"all {truth['accession'].n_unique():,} truth queries ({time.perf_counter() - started:.0f} s)",
        )


if __name__ == "__main__":
    main()
