"""The science of a finished lookup on a configuration and a database: truth read through the
loader's GAF filter, the reference annotations, the CAFA evaluation and the learned scorer's
training. The `evaluate`/`train-scorer` commands and the science assets call it; `core.evaluation`
and `core.scorer` get plain frames.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl


def read_truth(paths: list[Path], obo: Path, evidence: str | None) -> pl.DataFrame:
    """(protein_id, go_id) kept by the loader's GAF filter; prints what was dropped."""
    from .core.evaluation import EvaluationError
    from .db.sources import DEFAULT_EVIDENCE, read_gaf, read_obo

    codes = tuple(evidence.split(",")) if evidence else DEFAULT_EVIDENCE
    gaf = read_gaf(paths, read_obo(obo), codes)
    if gaf.kept.is_empty() and not any(gaf.skipped.values()):
        raise EvaluationError(f"{', '.join(str(p) for p in paths)}: no GAF annotation line (an empty file?)")
    dropped = ", ".join(f"{n:,} {why}" for why, n in gaf.skipped.items() if n)
    print(
        f"truth: {gaf.kept.height:,} annotations of {gaf.kept['protein_id'].n_unique():,} proteins"
        + (f" ({dropped} dropped)" if dropped else "")
    )
    return gaf.kept.select("protein_id", "go_id")


def query_accessions(experiment_path: Path) -> list[str]:
    """The accessions of the lookup's queries, from query_index_mapping.csv."""
    from .core.evaluation import EvaluationError

    mapping = Path(experiment_path) / "query_index_mapping.csv"
    if not mapping.exists():
        raise EvaluationError(f"{mapping} not found: run the lookup first")
    frame = pl.read_csv(mapping, infer_schema_length=0)
    return frame["accessions"].str.split("|").explode().drop_nulls().unique().sort().to_list()


def reference_annotations(engine=None) -> pl.DataFrame:
    """(protein_id, go_id) of every reference protein in the database."""
    from .db import get_engine
    from .db.stores import AnnotationStore
    from .paths import cache_dir

    annotations, _ = AnnotationStore(engine or get_engine(), cache_dir("annotations")).get()
    return annotations.select("protein_id", "go_id")


def evaluate_experiment(
    config,
    truth_paths: list[Path],
    obo: Path | None = None,
    evidence=None,
    out=None,
    roots=False,
    engine=None,
):
    """Evaluate a finished lookup; returns (Evaluation, written paths)."""
    from .core.evaluation import EvaluationError, evaluate, experiment_outputs, truth_table, write_evaluation
    from .core.ontology import read_ontology

    folder = Path(out or config.experiment_path / "evaluation")
    blocker = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:  # said before the evaluation, not by its first write
        raise EvaluationError(f"output folder {folder} cannot be made: {blocker} is a file, not a folder")
    ontology = read_ontology(obo)
    truth = truth_table(
        read_truth(truth_paths, obo, evidence), query_accessions(config.experiment_path), str(truth_paths[0])
    )
    result = evaluate(
        experiment_outputs(config.experiment_path),
        truth,
        ontology,
        reference_annotations(engine),
        roots=roots,
    )
    paths = write_evaluation(folder, result, config.precision)
    return result, paths


def lookup_rows(
    config, rerun: bool = False, engine=None
) -> tuple[pl.DataFrame, list[tuple[str, int | None]]]:
    """The lookup's raw rows of every enabled partition, from its Parquet files or a fresh run,
    and the (model, layer) pairs of those files: a partition without any neighbour included,
    which the scorer counts as a partition of 0 votes (`core.scorer.raw_partitions`)."""
    from .core.exports import layer_dir_name, model_dir_name

    base = config.experiment_path / "parquet"

    def files() -> list[tuple[Path, tuple[str, int | None]]]:
        found = []
        for model in config.enabled_models():
            for f in (base / model_dir_name(model.name)).glob("*/raw_rows.parquet"):
                name = f.parent.name
                layer = None if name == layer_dir_name(None) else int(name.removeprefix("layer_"))
                found.append((f, (model.name, layer)))
        return sorted(found, key=lambda entry: entry[0])

    if rerun or not files():
        from .runner import run_lookup

        if config.query_fasta is not None:  # a FASTA query file: embedded first, as the CLI does
            from .db import get_engine
            from .query_fasta import ensure_query_embeddings

            engine = engine or get_engine()
            ensure_query_embeddings(config, engine)
        run_lookup(config, engine)
    found = files()
    raw = pl.concat([pl.read_parquet(f) for f, _ in found], how="diagonal_relaxed")
    return raw, [partition for _, partition in found]


def training_set(
    raw: pl.DataFrame, truth: pl.DataFrame, ontology, references: pl.DataFrame, run: list | None = None
):
    """(features, labels, partitions, term statistics) of the candidates of truth proteins, in the
    aspects where each has truth (CAFA scores a protein only in those); `run`: the lookup's
    (model, layer) pairs, those without neighbours included (`lookup_rows`)."""
    from .core import scorer

    terms = scorer.term_statistics(references, ontology)
    frame, partitions = scorer.features(raw, ontology, terms, run)
    mapped, _ = ontology.map_ids(truth, "truth")
    aspects = (
        mapped.join(
            pl.DataFrame({"go_id": list(ontology.aspect), "aspect": list(ontology.aspect.values())}),
            on="go_id",
        )
        .select("accession", "aspect")
        .unique()
    )
    frame = frame.join(aspects, on=["accession", "aspect"], how="semi").sort("accession", "go_id")
    return frame, scorer.labels(frame, truth, ontology), partitions, terms


def train_scorer(
    config, truth_paths: list[Path], obo: Path, out: Path, evidence=None, folds=5, rerun=False, engine=None
):
    """Fit and save the learned scorer on CFG's queries; returns (model, features, labels)."""
    import hashlib

    from .core import scorer
    from .core.evaluation import truth_table
    from .core.ontology import read_ontology

    ontology = read_ontology(obo)
    raw, run = lookup_rows(config, rerun, engine)
    truth = truth_table(
        read_truth(truth_paths, obo, evidence), raw["accession"].unique().to_list(), str(truth_paths[0])
    )
    frame, y, partitions, terms = training_set(raw, truth, ontology, reference_annotations(engine), run)
    hashes = {str(p): hashlib.sha256(Path(p).read_bytes()).hexdigest() for p in truth_paths}
    hashes["features"] = scorer.frame_hash(frame)
    model = scorer.fit(frame, y, partitions, terms, hashes, n_folds=folds, per_aspect=config.per_aspect)
    scorer.save_scorer(out, model)
    return model, frame, y
