"""The learned scorer: features per (query, GO term) from every (model, layer), LightGBM, calibrated.

Trained on queries whose annotations are known (`fantasia-assets train-scorer`); its calibrated
probability becomes the score of predictions.tsv when the configuration names it
(`scoring.model`). Cross-validation and calibration are grouped by protein, so no protein is
ever scored by a model that saw it.
"""

from __future__ import annotations

import hashlib
import io
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from fantasia_assets.errors import FantasiaError

from . import exports
from .ontology import GeneOntology
from .scoring import PARTITION, Partition, consistent, neighbours, supported_terms

# the version of the learned scorer's features and fitting: bump when they change
SCORER_CODE_VERSION = "scorer-1"

EXPERIMENTAL = ("EXP", "IDA", "IPI", "IMP", "IGI", "IEP")
CURATOR = ("TAS", "IC")
PER_PARTITION = [
    "d_min",
    "d_mean",
    "rank_first",
    "ri_max",
    "votes",
    "vote_fraction",
    "spread",
    "weighted_vote",
]
ALIGNED = ["identity_max", "similarity_max", "identity_sw_max"]
GLOBAL = [
    "aspect_code",
    "term_frequency",
    "information_content",
    "agreement",
    "evidence_experimental",
    "evidence_curator",
]
FORMAT = 1
_PAIR = {"model_name": pl.String, "layer_index": pl.Int64}  # a partition's columns in raw rows


class ScorerError(FantasiaError, ValueError):
    """A scoring model that cannot be used as asked: unreadable, or made for other partitions or features."""


def partition_name(model: str, layer: int | None) -> str:
    return f"{model}|layer_{'legacy' if layer is None else layer}"


def feature_names(partitions: list[str], aligned: bool) -> list[str]:
    per = PER_PARTITION + (ALIGNED if aligned else [])
    return [f"{name}@{p}" for p in partitions for name in per] + GLOBAL


def raw_partitions(raw: pl.DataFrame, run: list[Partition] | None = None) -> list[str]:
    """The partitions' names in model, layer order: the run's (model, layer) pairs, those
    without raw rows included, else those `raw` holds."""
    pairs = raw.select(PARTITION) if run is None else pl.DataFrame(run, schema=_PAIR, orient="row")
    return [partition_name(m, layer) for m, layer in pairs.unique().sort(PARTITION, nulls_last=True).rows()]


def term_statistics(references: pl.DataFrame, ontology: GeneOntology) -> pl.DataFrame:
    """go_id, term_frequency (share of reference proteins carrying it, propagated), information_content."""
    closed = ontology.propagate_terms(references.select("protein_id", "go_id"), "protein_id")
    total = max(closed["protein_id"].n_unique(), 1)
    return (
        closed.group_by("go_id")
        .agg((pl.len() / total).alias("term_frequency"))
        .with_columns((-pl.col("term_frequency").log(2)).alias("information_content"))
        .sort("go_id")
    )


def features(
    raw: pl.DataFrame, ontology: GeneOntology, terms: pl.DataFrame, run: list[Partition] | None = None
) -> tuple[pl.DataFrame, list[str]]:
    """One row per candidate (accession, go_id, aspect) with the features; and the partitions
    (`raw_partitions`: `run`'s, else those `raw` holds).

    A candidate is a term some neighbour carries (propagated, roots out) in some partition.
    Per partition: distance minimum and mean over the supporting neighbours; the rank (1 = the
    nearest) of the first neighbour that supports the term; the best RI; vote count and
    fraction of the partition's neighbours; the spread (max − min) of the query's neighbour
    distances; the identity-weighted vote of `heuristic_scores` (before its √max factor); with alignment, the best
    global/local identity and similarity of a supporting neighbour. Then the term's reference
    frequency and information content, the share of partitions supporting it (agreement), and
    the share of supporting (partition, neighbour) pairs whose annotation under the term is
    experimental or a curator statement. A partition that does not support the term leaves its
    features missing (LightGBM's NaN branch), its votes 0.
    """
    partitions = raw_partitions(raw, run)
    aligned = "identity" in raw.columns and raw["identity"].null_count() < raw.height
    table = neighbours(raw).with_columns(
        pl.col("ri").rank("ordinal", descending=True).over("accession", *PARTITION).alias("rank")
    )
    first = raw.group_by("accession", *PARTITION, "ref_idx").agg(
        pl.col("distance").first(),
        *(pl.col(c).max().alias(f"{c}_max") for c in ("identity", "similarity", "identity_sw") if aligned),
    )
    table = table.join(first, on=["accession", *PARTITION, "ref_idx"])
    query_level = table.group_by("accession", *PARTITION).agg(
        pl.len().alias("n_neighbours"), (pl.col("distance").max() - pl.col("distance").min()).alias("spread")
    )
    weight = (pl.col("ri").clip(0.0, 1.0) * (pl.col("identity").fill_null(0.0) if aligned else 1.0)).alias(
        "weight"
    )
    support = supported_terms(raw, ontology).join(
        table.with_columns(weight), on=["accession", *PARTITION, "ref_idx"]
    )
    totals = (
        support.select("accession", *PARTITION, "ref_idx", "aspect", "weight")
        .unique()
        .group_by("accession", *PARTITION, "aspect")
        .agg(pl.col("weight").sum().alias("aspect_weight"))
    )
    evidence = _evidence(raw, ontology)
    per = (
        support.join(evidence, on=["accession", *PARTITION, "ref_idx", "go_id"], how="left")
        .group_by("accession", *PARTITION, "go_id", "aspect")
        .agg(
            pl.col("distance").min().alias("d_min"),
            pl.col("distance").mean().alias("d_mean"),
            pl.col("rank").min().cast(pl.Float64).alias("rank_first"),
            pl.col("ri").max().alias("ri_max"),
            pl.len().cast(pl.Float64).alias("votes"),
            pl.col("weight").sum().alias("weight"),
            pl.col("experimental").sum().alias("experimental"),
            pl.col("curator").sum().alias("curator"),
            *(pl.col(f"{c}_max").max() for c in ("identity", "similarity", "identity_sw") if aligned),
        )
        .join(query_level, on=["accession", *PARTITION])
        .join(totals, on=["accession", *PARTITION, "aspect"])
        .with_columns(
            (pl.col("votes") / pl.col("n_neighbours")).alias("vote_fraction"),
            (pl.col("weight") / pl.col("aspect_weight")).fill_nan(0.0).alias("weighted_vote"),
            pl.concat_str(
                pl.col("model_name"),
                pl.lit("|layer_"),
                pl.col("layer_index").cast(pl.String).fill_null("legacy"),
            ).alias("partition"),
        )
    )
    names = PER_PARTITION + (ALIGNED if aligned else [])
    wide = per.pivot(on="partition", index=["accession", "go_id", "aspect"], values=names, separator="@")
    # pivot names columns value@partition only when several values are pivoted
    for name in names:
        for p in partitions:
            if f"{name}@{p}" not in wide.columns:
                wide = wide.with_columns(pl.lit(None, pl.Float64).alias(f"{name}@{p}"))
    shares = per.group_by("accession", "go_id").agg(
        (pl.len() / len(partitions)).alias("agreement"),
        (pl.col("experimental").sum() / pl.col("votes").sum()).alias("evidence_experimental"),
        (pl.col("curator").sum() / pl.col("votes").sum()).alias("evidence_curator"),
    )
    frame = (
        wide.join(shares, on=["accession", "go_id"])
        .join(terms, on="go_id", how="left")
        .with_columns(
            pl.col("aspect")
            .replace_strict({"P": 0.0, "F": 1.0, "C": 2.0}, return_dtype=pl.Float64)
            .alias("aspect_code"),
            *(
                pl.col(f"{n}@{p}").fill_null(0.0)
                for n in ("votes", "vote_fraction", "weighted_vote")
                for p in partitions
            ),
        )
        .sort("accession", "go_id")
    )
    return frame.select("accession", "go_id", "aspect", *feature_names(partitions, aligned)), partitions


def _evidence(raw: pl.DataFrame, ontology: GeneOntology) -> pl.DataFrame:
    """Per (query, partition, neighbour, propagated term): 1 when an annotation under the term
    has experimental evidence / is a curator statement."""
    direct = raw.select("accession", *PARTITION, "ref_idx", "go_id", "evidence_code").unique()
    direct, _ = ontology.map_ids(direct, "raw rows")
    return (
        direct.join(ontology.closure, on="go_id")
        .group_by("accession", *PARTITION, "ref_idx", pl.col("ancestor").alias("go_id"))
        .agg(
            pl.col("evidence_code").is_in(list(EXPERIMENTAL)).any().cast(pl.Float64).alias("experimental"),
            pl.col("evidence_code").is_in(list(CURATOR)).any().cast(pl.Float64).alias("curator"),
        )
    )


def labels(candidates: pl.DataFrame, truth: pl.DataFrame, ontology: GeneOntology) -> np.ndarray:
    """1 where the candidate (accession, go_id) is in the propagated truth (accession, go_id)."""
    known = ontology.propagate_terms(ontology.map_ids(truth, "truth")[0], "accession").with_columns(
        pl.lit(1, pl.Int8).alias("label")
    )
    joined = candidates.select("accession", "go_id").join(known, on=["accession", "go_id"], how="left")
    return joined["label"].fill_null(0).to_numpy().astype(np.int8)


def protein_folds(accessions: np.ndarray, n_folds: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """(train rows, held-out rows) per fold; every protein's rows fall in exactly one held-out fold."""
    proteins = np.unique(accessions)
    if len(proteins) < n_folds:
        raise ScorerError(f"{len(proteins)} labelled proteins: too few for {n_folds}-fold cross-validation")
    order = np.random.default_rng(seed).permutation(len(proteins))
    fold_of = dict(zip(proteins[order].tolist(), (np.arange(len(proteins)) % n_folds).tolist(), strict=True))
    assigned = np.fromiter((fold_of[a] for a in accessions.tolist()), dtype=np.int64, count=len(accessions))
    return [(np.flatnonzero(assigned != f), np.flatnonzero(assigned == f)) for f in range(n_folds)]


@dataclass
class Scorer:
    """Calibrated models (one per fold) and what they were made from."""

    models: list  # CalibratedClassifierCV-like objects with predict_proba
    features: list[str]
    partitions: list[str]
    terms: pl.DataFrame  # go_id, term_frequency, information_content of the training references
    versions: dict[str, str]
    training_hashes: dict[str, str]
    cross_validation: dict[str, float] = field(default_factory=dict)
    per_aspect: bool = False  # trained on the neighbours of a `lookup.per_aspect` search

    def check(self, partitions: list[str], names: list[str], per_aspect: bool = False) -> None:
        """Refuse other partitions, features or neighbour search than the model was trained on,
        naming the difference."""
        if per_aspect != self.per_aspect:
            said = {True: "per aspect (lookup.per_aspect: true)", False: "over all references"}
            raise ScorerError(
                f"the scoring model was trained on neighbours searched {said[self.per_aspect]}, "
                f"the lookup searched {said[per_aspect]}"
            )
        if partitions != self.partitions:
            missing = sorted(set(self.partitions) - set(partitions))
            extra = sorted(set(partitions) - set(self.partitions))
            raise ScorerError(
                f"the scoring model was trained on partitions {self.partitions}, the lookup has {partitions}"
                f" (missing: {missing or 'none'}, not in the model: {extra or 'none'})"
            )
        if names != self.features:
            missing = [n for n in self.features if n not in names]
            extra = [n for n in names if n not in self.features]
            raise ScorerError(
                f"the scoring model expects other features (missing: {missing[:6] or 'none'}, "
                f"not in the model: {extra[:6] or 'none'}); alignment on/off must match the training run"
            )

    def probabilities(self, frame: pl.DataFrame) -> np.ndarray:
        matrix = frame.select(self.features).to_numpy().astype(np.float64)
        return np.mean([m.predict_proba(matrix)[:, 1] for m in self.models], axis=0)

    def predict(
        self,
        raw: pl.DataFrame,
        ontology: GeneOntology,
        per_aspect: bool = False,
        run: list[Partition] | None = None,
    ) -> pl.DataFrame:
        """The calibrated probability of each candidate; `run`: the lookup's (model, layer)
        pairs, those without raw rows included (`features`)."""
        frame, partitions = features(raw, ontology, self.terms, run)
        names = [c for c in frame.columns if c not in ("accession", "go_id", "aspect")]
        self.check(partitions, names, per_aspect)
        scores = frame.select("accession", "go_id").with_columns(
            pl.Series("score", self.probabilities(frame))
        )
        return consistent(scores, ontology)

    def to_bytes(self) -> bytes:
        return pickle.dumps({"format": FORMAT, **self.__dict__}, protocol=pickle.HIGHEST_PROTOCOL)


def fit(
    frame: pl.DataFrame,
    y: np.ndarray,
    partitions: list[str],
    terms: pl.DataFrame,
    training_hashes: dict[str, str],
    n_folds: int = 5,
    seed: int = 0,
    per_aspect: bool = False,
) -> Scorer:
    """LightGBM per protein fold, each calibrated (isotonic) on its held-out proteins."""
    import lightgbm
    import sklearn
    from sklearn.calibration import CalibratedClassifierCV
    from sklearn.frozen import FrozenEstimator
    from sklearn.metrics import roc_auc_score

    names = [c for c in frame.columns if c not in ("accession", "go_id", "aspect")]
    matrix = frame.select(names).to_numpy().astype(np.float64)
    if y.sum() == 0 or y.sum() == len(y):
        raise ScorerError("the truth gives only one class for the candidates: nothing to learn")
    models, held_out = [], np.zeros(len(y))
    for train, test in protein_folds(frame["accession"].to_numpy(), n_folds, seed):
        booster = lightgbm.LGBMClassifier(
            n_estimators=300, learning_rate=0.05, num_leaves=31, min_child_samples=40,
            subsample=0.8, subsample_freq=1, colsample_bytree=0.8, random_state=seed, n_jobs=1, verbose=-1,
        )  # fmt: skip
        booster.fit(matrix[train], y[train])
        calibrated = CalibratedClassifierCV(FrozenEstimator(booster), method="isotonic")
        calibrated.fit(matrix[test], y[test])
        held_out[test] = booster.predict_proba(matrix[test])[:, 1]
        models.append(calibrated)
    versions = {
        "lightgbm": lightgbm.__version__,
        "scikit-learn": sklearn.__version__,
        "polars": pl.__version__,
    }
    return Scorer(
        models=models, features=names, partitions=partitions, terms=terms, versions=versions,
        training_hashes=training_hashes, cross_validation={"auc_out_of_fold": float(roc_auc_score(y, held_out))},
        per_aspect=per_aspect,
    )  # fmt: skip


def frame_hash(frame: pl.DataFrame) -> str:
    buffer = io.BytesIO()
    frame.write_ipc(buffer)
    return hashlib.sha256(buffer.getvalue()).hexdigest()


def save_scorer(path: Path, scorer: Scorer) -> Path:
    exports.write_bytes_atomic(Path(path), scorer.to_bytes())
    return Path(path)


# What a scoring model's pickle may name (module, name): the classes `fit` builds and what they
# pickle through, as a model of this code holds them (numpy's two module layouts). A pickle runs
# whatever callable it names as it is read, so any other name is refused before it is looked up:
# a file crafted to run a command (`os.system`) fails, and runs nothing.
_MODEL_GLOBALS = frozenset(
    {
        ("collections", "OrderedDict"),
        ("collections", "defaultdict"),
        ("lightgbm.basic", "Booster"),
        ("lightgbm.sklearn", "LGBMClassifier"),
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        *(
            (f"numpy.{core}.multiarray", name)
            for core in ("_core", "core")
            for name in ("scalar", "_reconstruct")
        ),
        *((f"numpy.{core}.numeric", "_frombuffer") for core in ("_core", "core")),
        ("polars.dataframe.frame", "DataFrame"),
        ("sklearn.calibration", "CalibratedClassifierCV"),
        ("sklearn.calibration", "_CalibratedClassifier"),
        ("sklearn.frozen._frozen", "FrozenEstimator"),
        ("sklearn.isotonic", "IsotonicRegression"),
        ("sklearn.preprocessing._label", "LabelEncoder"),
    }
)


class _ModelUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _MODEL_GLOBALS:
            raise pickle.UnpicklingError(
                f"it names {module}.{name}, which no scoring model holds; it was not run (a pickle runs "
                "what it names as it is read: only what train-scorer writes is read)"
            )
        return super().find_class(module, name)


def load_scorer(path: Path) -> Scorer:
    """Read a model written by `save_scorer`: a pickle, read with `_MODEL_GLOBALS` only."""
    path = Path(path)
    try:
        payload = _ModelUnpickler(io.BytesIO(path.read_bytes())).load()
    except FileNotFoundError as exc:
        raise ScorerError(f"{path}: scoring model not found") from exc
    except Exception as exc:
        raise ScorerError(f"{path}: not a scoring model ({exc})") from exc
    if not isinstance(payload, dict) or "format" not in payload:
        raise ScorerError(
            f"{path}: not a scoring model (a pickled {type(payload).__name__}; `fantasia-assets "
            "train-scorer` writes one)"
        )
    if payload["format"] != FORMAT:
        raise ScorerError(
            f"{path}: a scoring model of format {payload['format']!r}, this version reads format "
            f"{FORMAT}; train it again with `fantasia-assets train-scorer`"
        )
    payload.pop("format")
    return Scorer(**payload)
