"""Assets of the final predictions, the learned scorer and the CAFA evaluation."""

from __future__ import annotations

import base64
from pathlib import Path

import dagster as dg
import polars as pl

from .. import runner, science
from ..core.evaluation import EVALUATION_CODE_VERSION
from ..core.scorer import SCORER_CODE_VERSION
from ..core.scoring import PREDICTIONS_CODE_VERSION, run_predictions
from ..core.timing import timed
from .lookup import raw_result_shards
from .outputs import lookup_summary, materialised, topgo_ensemble
from .partitions import LookupState, outputs_fingerprint
from .resources import LookupSettings, ReferenceDatabase


class TruthAnnotations(dg.ConfigurableResource):
    """Known GO annotations of the queries, for training and evaluation: `FANTASIA_TRUTH`
    (GAF paths separated by commas), with the GO ontology of the configuration's scoring.ontology."""

    gaf_paths: str = ""

    def paths(self) -> list[Path]:
        paths = [Path(p.strip()) for p in self.gaf_paths.split(",") if p.strip()]
        if not paths:
            raise dg.Failure(
                "no truth annotations: set FANTASIA_TRUTH to one or more GAF files (comma-separated)"
            )
        return paths


def _ontology(state: LookupState) -> Path:
    if state.config.scoring.ontology is None:
        raise dg.Failure("scoring.ontology is not set in the configuration: predictions need the GO graph")
    return state.config.scoring.ontology


@dg.asset(
    group_name="science",
    deps=[raw_result_shards],
    kinds={"tsv"},
    code_version=PREDICTIONS_CODE_VERSION,
    automation_condition=dg.AutomationCondition.eager(),
    description="predictions.tsv: accession, go_id, aspect, score in [0, 1], GO-consistent (no term below a "
    "descendant, roots left out); the learned scorer's probability when scoring.model is set.",
)
def predictions(context, settings: LookupSettings, database: ReferenceDatabase) -> dg.MaterializeResult:
    # `context` unannotated: annotations are strings in this module, which Dagster cannot resolve
    state = LookupState.open(settings, database)
    if state.config.scoring.ontology is None:
        # as the CLI's lookup: not an error (the automation rebuilds it after every lookup),
        # said in the log and the metadata
        reason = "scoring.ontology is not set in the configuration: predictions need the GO graph"
        context.log.warning(f"predictions.tsv not written: {reason}")
        earlier = state.config.experiment_path / "predictions.tsv"
        if earlier.is_file():  # it would not match the summary beside it any more (as the CLI's run)
            earlier.unlink()
            context.log.warning(f"removed {earlier}, written by an earlier run")
        version = outputs_fingerprint(state.config)
        return dg.MaterializeResult(
            metadata={"written": False, "reason": reason, "outputs_config_version": version}
        )
    timings: dict[str, float] = {}
    with timed(timings, "predictions"):
        partitions = materialised(state)
        raw = runner.read_raw_rows(state.config, partitions)
        path = run_predictions(
            state.config.experiment_path, raw, state.config.scoring, state.config.precision,
            [(p.model.name, p.layer) for p in partitions],  # those without neighbours too, as the CLI
        )["predictions"]  # fmt: skip
    frame = pl.read_csv(path, separator="\t")
    top = frame.sort("score", descending=True).head(10)
    preview = "\n".join(["| accession | go_id | aspect | score |", "|---|---|---|---:|"] + [
        f"| {a} | {g} | {asp} | {s:.3f} |" for a, g, asp, s in top.iter_rows()
    ])  # fmt: skip
    return dg.MaterializeResult(
        metadata={
            "rows": frame.height,
            "outputs_config_version": outputs_fingerprint(state.config),  # `daily_outputs_backstop`
            "scorer": str(state.config.scoring.model or "heuristic: identity-weighted neighbour votes"),
            "predictions": dg.MetadataValue.path(str(path)),
            "top": dg.MetadataValue.md(preview),
            "seconds": timings["predictions"],
        }
    )


@dg.asset(
    group_name="science",
    deps=[raw_result_shards],
    kinds={"lightgbm"},
    code_version=SCORER_CODE_VERSION,
    description="The learned scorer ({experiment_path}/scoring/model.pkl) fitted on the configured queries "
    "labelled by FANTASIA_TRUTH; set scoring.model to it to score predictions.tsv with it.",
)
def scoring_model(
    settings: LookupSettings, database: ReferenceDatabase, truth: TruthAnnotations
) -> dg.MaterializeResult:
    state = LookupState.open(settings, database)
    out = state.config.experiment_path / "scoring" / "model.pkl"
    model, frame, y = science.train_scorer(
        state.config, truth.paths(), _ontology(state), out, engine=state.engine
    )
    return dg.MaterializeResult(
        metadata={
            "model": dg.MetadataValue.path(str(out)),
            "proteins": frame["accession"].n_unique(),
            "candidates": len(y),
            "positives": int(y.sum()),
            "auc_out_of_fold": model.cross_validation["auc_out_of_fold"],
            "partitions": dg.MetadataValue.json(model.partitions),
            "versions": dg.MetadataValue.json(model.versions),
        }
    )


@dg.asset(
    group_name="science",
    deps=[predictions, lookup_summary, topgo_ensemble],
    kinds={"cafaeval"},
    code_version=EVALUATION_CODE_VERSION,
    description="evaluation/metrics.tsv: Fmax, Smin, weighted Fmax, coverage and threshold per aspect for every "
    "output, by the CAFA evaluator against FANTASIA_TRUTH; precision-recall curves shown here.",
)
def evaluation(
    settings: LookupSettings, database: ReferenceDatabase, truth: TruthAnnotations
) -> dg.MaterializeResult:
    state = LookupState.open(settings, database)
    result, paths = science.evaluate_experiment(
        state.config, truth.paths(), _ontology(state), engine=state.engine
    )
    image = base64.b64encode(paths["plot"].read_bytes()).decode()
    table = "\n".join(["| output | aspect | Fmax | Smin | wFmax | coverage |", "|---|---|---:|---:|---:|---:|"] + [
        f"| {r['output']} | {r['aspect']} | {r['fmax']:.3f} | {float('nan') if r['smin'] is None else r['smin']:.2f} | {r['wfmax']:.3f} | "
        f"{r['coverage']:.2f} |" for r in result.metrics.iter_rows(named=True)
    ])  # fmt: skip
    return dg.MaterializeResult(
        metadata={
            "metrics": dg.MetadataValue.md(table),
            "precision_recall": dg.MetadataValue.md(f"![precision-recall](data:image/png;base64,{image})"),
            "metrics_file": dg.MetadataValue.path(str(paths["metrics"])),
            "truth_proteins": dg.MetadataValue.json(result.truth_proteins),
        }
    )
