"""`fantasia-assets evaluate` and `train-scorer`: CAFA metrics of a lookup and the learned scorer.

Arguments and reports; the work itself is in `science.py`, shared with the science assets.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # polars and the science stack are imported by the commands that use them
    import polars as pl

log = logging.getLogger(__name__)


def _folds(text: str) -> int:
    """--folds: cross-validation needs a held-out fold and one to fit on."""
    try:
        folds = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if folds < 2:
        raise argparse.ArgumentTypeError(f"{folds}: at least 2 (one fold held out, the others fitted)")
    return folds


def _truth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, required=True, help="configuration YAML of the lookup")
    parser.add_argument(
        "--truth",
        type=Path,
        action="append",
        required=True,
        help="GOA GAF with the known annotations; repeatable",
    )
    parser.add_argument(
        "--obo", type=Path, help="GO OBO (.gz accepted); default: the config's scoring.ontology"
    )
    parser.add_argument(
        "--evidence",
        default=None,
        help="evidence codes kept in the truth (default: EXP,IDA,IPI,IMP,IGI,IEP,TAS,IC)",
    )


def add_parsers(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate",
        help="CAFA metrics (cafaeval) of every output of a lookup against known annotations",
        description=(
            "Fmax, Smin, weighted Fmax, coverage and the threshold at Fmax per aspect, computed by "
            "the CAFA evaluator (cafaeval) for predictions.tsv, each (model, layer)'s TopGO, the "
            "ensemble and each final_score of summary.csv. Truth: the GAF lines that the loader "
            "keeps (experimental evidence, NOT dropped, alt ids mapped), propagated. Information "
            "accretion from the reference annotations in the database. Writes "
            "{experiment_path}/evaluation/metrics.tsv, curves.tsv and precision_recall.png."
        ),
    )
    _truth_arguments(evaluate)
    evaluate.add_argument("--out", type=Path, help="output folder (default: {experiment_path}/evaluation)")
    evaluate.add_argument("--roots", action="store_true", help="also score the three GO roots")
    train = commands.add_parser(
        "train-scorer",
        help="fit the learned scorer on queries with known annotations",
        description=(
            "Reuse the raw rows of the --config lookup (or run it), build features per (query, GO term) "
            "from every (model, layer), label them with the truth GAF (loader's filter, "
            "propagated) and fit LightGBM with isotonic calibration, folds grouped by protein. "
            "The model file records the features, partitions, library versions and the hashes of "
            "the training data; `scoring: {model: PATH}` makes the lookup use it."
        ),
    )
    _truth_arguments(train)
    train.add_argument("--out", type=Path, required=True, help="model file to write")
    train.add_argument(
        "--folds", type=_folds, default=5, help="protein-grouped folds, at least 2 (default 5)"
    )
    train.add_argument("--rerun", action="store_true", help="run the lookup even when its raw rows exist")


def _ontology_path(args, config) -> Path:
    from .config import ConfigError

    path = args.obo or config.scoring.ontology
    if path is None:
        raise ConfigError("no GO ontology: pass --obo or set scoring.ontology in the configuration")
    return path


def metrics_table(metrics: pl.DataFrame) -> list[str]:
    """Fmax (Smin) per aspect, one line per output."""
    import polars as pl

    lines = [
        f"{'output':<40} {'BP Fmax':>8} {'MF Fmax':>8} {'CC Fmax':>8}   {'BP Smin':>8} {'MF Smin':>8} {'CC Smin':>8}"
    ]
    for output in sorted(set(metrics["output"].to_list())):
        rows = {r["aspect"]: r for r in metrics.filter(pl.col("output") == output).iter_rows(named=True)}
        fmax = [f"{rows[a]['fmax']:8.3f}" if a in rows else f"{'-':>8}" for a in "PFC"]
        smin = [
            f"{rows[a]['smin']:8.2f}" if a in rows and rows[a]["smin"] is not None else f"{'-':>8}"
            for a in "PFC"
        ]
        lines.append(f"{output:<40} {' '.join(fmax)}   {' '.join(smin)}")
    return lines


def run_evaluate(args, progress) -> int:
    from .config import load_config
    from .science import evaluate_experiment

    config = load_config(args.config)
    result, paths = evaluate_experiment(
        config, args.truth, _ontology_path(args, config), args.evidence, args.out, args.roots
    )
    counts = ", ".join(f"{a} {n:,}" for a, n in sorted(result.truth_proteins.items()))
    print(f"evaluated against {counts} truth proteins (cafaeval)")
    for line in metrics_table(result.metrics):
        print(line)
    for name, path in paths.items():
        print(f"  {name}: {path}")
    return 0


def demo_evaluation(config) -> None:
    """`make demo`'s last step: the sample queries' outputs against their mouse GOA slice."""
    from .sample import SAMPLE_DIR
    from .science import evaluate_experiment

    if config.scoring.ontology is None:
        print("evaluation skipped: scoring.ontology is not set")
        return
    truth = SAMPLE_DIR / "queries_truth.gaf.gz"
    result, paths = evaluate_experiment(config, [truth], config.scoring.ontology)
    print(
        f"--- CAFA evaluation (cafaeval) of the sample queries against {truth.name}: Fmax and Smin per aspect"
    )
    for line in metrics_table(result.metrics):
        print(line)
    print(f"  metrics: {paths['metrics']}, curves: {paths['plot']}")


def run_train(args, progress) -> int:
    from .config import load_config
    from .science import train_scorer

    config = load_config(args.config)
    model, frame, y = train_scorer(
        config, args.truth, _ontology_path(args, config), args.out, args.evidence, args.folds, args.rerun
    )
    partitions = model.partitions
    print(
        f"trained on {frame['accession'].n_unique():,} proteins, {len(y):,} candidate terms "
        f"({int(y.sum()):,} true), partitions {', '.join(partitions)}, {len(model.features)} features"
    )
    print(f"out-of-fold AUC (folds grouped by protein): {model.cross_validation['auc_out_of_fold']:.3f}")
    print(f"model: {args.out}")
    return 0


HANDLERS = {"evaluate": run_evaluate, "train-scorer": run_train}
