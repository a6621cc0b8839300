"""CAFA evaluation of the lookup's outputs with the CAFA evaluator itself (cafaeval).

Per output and aspect: Fmax, Smin (information-accretion weighted remaining uncertainty and
misinformation, as CAFA defines it), weighted Fmax, coverage and threshold at Fmax. The
information accretion comes from the reference annotations, propagated. Every truth protein
is a target: one without predictions counts as a miss (cafaeval's "cafa" normalisation divides
recall by every truth protein, precision by the proteins predicted at that threshold).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from fantasia_assets.errors import FantasiaError

from . import exports, scratch
from .ontology import GeneOntology, plain_obo

log = logging.getLogger(__name__)

# the version of the evaluation protocol (truth filter, propagation, IA): bump when it changes
EVALUATION_CODE_VERSION = "evaluation-1"

NAMESPACE_ASPECT = {"biological_process": "P", "molecular_function": "F", "cellular_component": "C"}
METRIC_COLUMNS = ["output", "aspect", "fmax", "smin", "wfmax", "coverage", "threshold"]
SCORE_SCHEMA = {"accession": pl.String, "go_id": pl.String, "score": pl.Float64}


class EvaluationError(FantasiaError, ValueError):
    """The evaluation cannot run: empty predictions, a truth set that misses the queries, …"""


@dataclass
class Evaluation:
    metrics: pl.DataFrame  # METRIC_COLUMNS, one row per (output, aspect) with truth
    curves: pl.DataFrame  # output, aspect, tau, precision, recall, coverage (cafaeval's rows)
    truth_proteins: dict[str, int]  # aspect → truth proteins evaluated


def experiment_outputs(experiment_path: Path) -> dict[str, pl.DataFrame]:
    """Every scored output of a lookup folder as (accession, go_id, score) frames, by name.

    `predictions` (predictions.tsv), `topgo_{model}_{layer}` and `topgo_ensemble` (the TopGO
    files, RI as score), and `summary_{final_score column}` for each partition's final_score
    in summary.csv.
    """
    base = Path(experiment_path)
    outputs: dict[str, pl.DataFrame] = {}
    predictions = base / "predictions.tsv"
    if predictions.exists():
        outputs["predictions"] = pl.read_csv(
            predictions, separator="\t", schema_overrides=SCORE_SCHEMA
        ).select(list(SCORE_SCHEMA))
    topgo = base / "topgo"
    folders = sorted({f.parent for f in topgo.glob("**/*.topgo")}) if topgo.is_dir() else []
    for folder in folders:
        name = "topgo_" + "_".join(folder.relative_to(topgo).parts)
        frames = [
            pl.read_csv(
                f, separator="\t", has_header=False, new_columns=list(SCORE_SCHEMA), schema=SCORE_SCHEMA
            )
            for f in sorted(folder.glob("*.topgo"))
            if f.stat().st_size
        ]
        outputs[name] = pl.concat(frames) if frames else pl.DataFrame(schema=SCORE_SCHEMA)
    summary = base / "summary.csv"
    if summary.exists():
        frame = pl.read_csv(summary, infer_schema_length=0)
        for column in sorted(c for c in frame.columns if c.startswith("final_score")):
            outputs[f"summary_{column}"] = frame.select(
                "accession", "go_id", pl.col(column).cast(pl.Float64).alias("score")
            ).drop_nulls()
    if not outputs:
        raise EvaluationError(
            f"{base}: no predictions.tsv, TopGO files or summary.csv to evaluate; run the lookup"
        )
    return outputs


def truth_table(annotations: pl.DataFrame, queries: list[str], source: str) -> pl.DataFrame:
    """The truth (accession, go_id) of the query proteins; an error when no query is in it."""
    truth = (
        annotations.select(pl.col("protein_id").alias("accession"), "go_id")
        .unique()
        .sort("accession", "go_id")
    )
    if truth.is_empty():
        raise EvaluationError(
            f"{source}: no annotation left after the GAF filter (NOT qualifiers, evidence codes, "
            "obsolete or unknown GO terms)"
        )
    overlap = truth.filter(pl.col("accession").is_in(queries))
    if overlap.is_empty():
        raise EvaluationError(
            f"{source}: none of its {truth['accession'].n_unique():,} proteins is among the "
            f"{len(queries):,} queries (e.g. {', '.join(sorted(queries)[:3])}); wrong truth file or query set?"
        )
    return overlap


def evaluate(
    outputs: dict[str, pl.DataFrame],
    truth: pl.DataFrame,
    ontology: GeneOntology,
    reference_annotations: pl.DataFrame,
    th_step: float = 0.01,
    threads: int = 1,
    roots: bool = False,
    whole_ontology: bool = False,
) -> Evaluation:
    """Run cafaeval once over every output against `truth` (accession, go_id).

    `reference_annotations` (protein_id, go_id) give the information accretion. GO ids are
    mapped to live primary ids; ids the ontology does not know are dropped and reported.
    The three roots are not scored unless `roots` (cafaeval's `-no_orphans`: every predicted
    protein would otherwise earn them for free). cafaeval gets the part of the ontology that
    truth and predictions reach (`whole_ontology` gives it the whole file: same metrics, slower).
    """
    from cafaeval.evaluation import cafa_eval

    truth, unknown = ontology.map_ids(truth, "truth")
    if unknown:
        log.warning("truth: %d GO ids not in the ontology dropped (%s)", len(unknown), ", ".join(unknown[:5]))
    if truth.is_empty():
        raise EvaluationError("truth: no annotation with a GO id of the ontology")
    targets = set(truth["accession"].unique().to_list())
    references, _ = ontology.map_ids(reference_annotations.select("protein_id", "go_id"), "references")
    ia = ontology.information_accretion(references)
    names: dict[str, str] = {}
    used: set[str] = set()
    with scratch.folder("eval") as tmp:
        folder = Path(tmp)
        (folder / "predictions").mkdir()
        for i, (name, frame) in enumerate(sorted(outputs.items())):
            if frame.is_empty():
                raise EvaluationError(f"output {name!r} is empty: nothing to evaluate")
            frame, unknown = ontology.map_ids(frame.select(list(SCORE_SCHEMA)), name)
            if unknown:
                log.warning(
                    "%s: %d GO ids not in the ontology dropped (%s)",
                    name,
                    len(unknown),
                    ", ".join(unknown[:5]),
                )
            scored = frame.filter(pl.col("accession").is_in(targets))
            if scored.is_empty():
                log.warning("%s: no prediction for any truth protein; every target counts as a miss", name)
            file_name = f"output_{i:03d}.tsv"
            names[file_name] = name
            scored.sort("accession", "go_id").write_csv(
                folder / "predictions" / file_name, separator="\t", include_header=False, float_precision=6
            )
            used.update(scored["go_id"].unique().to_list())
        truth.write_csv(folder / "truth.tsv", separator="\t", include_header=False)
        ia.write_csv(folder / "ia.tsv", separator="\t", include_header=False)
        if whole_ontology:
            obo = plain_obo(ontology.source, folder)
        else:
            obo = folder / "ontology.obo"
            obo.write_text(ontology.obo_subset(used | set(truth["go_id"].to_list())))
        all_rows, _ = cafa_eval(
            str(obo),
            str(folder / "predictions"),
            str(folder / "truth.tsv"),
            ia=str(folder / "ia.tsv"),
            no_orphans=not roots,
            th_step=th_step,
            n_cpu=threads,
        )
    counts = truth.join(
        pl.DataFrame({"go_id": list(ontology.aspect), "aspect": list(ontology.aspect.values())}), on="go_id"
    )
    truth_proteins = {
        a: n for a, n in counts.group_by("aspect").agg(pl.col("accession").n_unique()).iter_rows()
    }
    return _summarise(all_rows, names, sorted(truth_proteins), truth_proteins)


def _summarise(
    all_rows, names: dict[str, str], aspects: list[str], truth_proteins: dict[str, int]
) -> Evaluation:
    """metrics.tsv rows from cafaeval's per-threshold table; an (output, aspect) that cafaeval
    left out (nothing predicted for that aspect's targets) scores Fmax 0, coverage 0."""
    if all_rows is None:
        curves = pl.DataFrame(
            schema={"output": pl.String, "aspect": pl.String, "tau": pl.Float64, "precision": pl.Float64,
                    "recall": pl.Float64, "coverage": pl.Float64, "f": pl.Float64, "s_w": pl.Float64,
                    "f_w": pl.Float64}
        )  # fmt: skip
    else:
        table = pl.from_pandas(all_rows.reset_index())
        curves = table.select(
            pl.col("filename").replace_strict(names).alias("output"),
            pl.col("ns").replace_strict(NAMESPACE_ASPECT).alias("aspect"),
            pl.col("tau").cast(pl.Float64),
            pl.col("pr").alias("precision"),
            pl.col("rc").alias("recall"),
            pl.col("cov").alias("coverage"),
            "f",
            "s_w",
            "f_w",
        ).sort("output", "aspect", "tau")
    rows = []
    for output in sorted(names.values()):
        for aspect in aspects:
            curve = curves.filter(pl.col("output") == output, pl.col("aspect") == aspect)
            if curve.is_empty():
                rows.append((output, aspect, 0.0, None, 0.0, 0.0, None))
                continue
            # cafaeval's own choice of the best row: the first threshold reaching the maximum
            best = curve.row(int(curve["f"].arg_max()), named=True)
            weighted = curve["f_w"].max()
            smin = curve["s_w"].min()
            rows.append((output, aspect, best["f"], smin, weighted, best["coverage"], best["tau"]))
    metrics = pl.DataFrame(
        rows,
        schema={"output": pl.String, "aspect": pl.String, "fmax": pl.Float64, "smin": pl.Float64,
                "wfmax": pl.Float64, "coverage": pl.Float64, "threshold": pl.Float64},
        orient="row",
    )  # fmt: skip
    return Evaluation(metrics=metrics, curves=curves, truth_proteins=truth_proteins)


def write_evaluation(directory: Path, evaluation: Evaluation, precision: int = 4) -> dict[str, Path]:
    """evaluation/metrics.tsv, curves.tsv and precision_recall.png, each written atomically."""
    directory = Path(directory)
    metrics = directory / "metrics.tsv"
    exports.write_bytes_atomic(metrics, exports.csv_bytes(evaluation.metrics, precision, separator="\t"))
    curves = directory / "curves.tsv"
    exports.write_bytes_atomic(curves, exports.csv_bytes(evaluation.curves, precision, separator="\t"))
    plot = directory / "precision_recall.png"
    exports.write_bytes_atomic(plot, precision_recall_png(evaluation))
    return {"metrics": metrics, "curves": curves, "plot": plot}


def precision_recall_png(evaluation: Evaluation) -> bytes:
    """One panel per aspect, one curve per output, its Fmax point marked."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    titles = {"P": "biological process", "F": "molecular function", "C": "cellular component"}
    aspects = [a for a in ("P", "F", "C") if a in set(evaluation.metrics["aspect"].to_list())]
    figure, axes = plt.subplots(
        1, max(len(aspects), 1), figsize=(5 * max(len(aspects), 1), 4.6), squeeze=False
    )
    for axis, aspect in zip(axes[0], aspects, strict=False):
        for output in sorted(set(evaluation.metrics["output"].to_list())):
            curve = evaluation.curves.filter(pl.col("output") == output, pl.col("aspect") == aspect)
            if curve.is_empty():
                continue
            best = curve.row(int(curve["f"].arg_max()), named=True)
            line = axis.plot(curve["recall"], curve["precision"], label=f"{output} ({best['f']:.3f})")[0]
            axis.plot([best["recall"]], [best["precision"]], "o", color=line.get_color())
        axis.set(
            title=f"{titles[aspect]}: Fmax", xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1)
        )
        axis.grid(alpha=0.3)
        axis.legend(fontsize=6, loc="upper right")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()
