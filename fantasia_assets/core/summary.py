"""Scoring GO transfers: the summary's column plan, and TopGO tables of one partition.

`SummarySpec` turns the `postprocess.summary` block (SPEC §2.3) into the score columns of
`summary.csv` (SPEC §4.2); `core.aggregate` computes them over every partition in DuckDB.
`topgo_tables` builds one partition's TopGO tables (SPEC §4.3) from its raw rows in memory,
as a polars DataFrame or LazyFrame.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from numbers import Real

import polars as pl

log = logging.getLogger(__name__)

RawRows = pl.DataFrame | pl.LazyFrame

TERM_KEYS = ("accession", "go_id")
PARTITION_KEYS = ("model_name", "layer_index")
TOPGO_COLUMNS = ("accession", "go_id", "reliability_index")

COUNT = "count"
FINAL_SCORE = "final_score"

# Aggregation word as the user writes it → the aggregation computed. "avg" is the original's synonym
# of mean; the output keeps the user's word (`avg_id_g`) so a configured column name is never renamed.
AGGREGATIONS = {"min": "min", "max": "max", "mean": "mean", "avg": "mean"}
_AGG_SYNONYM = {"avg": "mean", "mean": "avg"}

_TOPGO_REQUIRED = (*TERM_KEYS, *PARTITION_KEYS, "category", "reliability_index")


@dataclass(frozen=True)
class SummaryColumn:
    """One per-(model, layer) score column of the summary, before the model/layer suffix.

    `metric` is the raw column aggregated (or "count"), `agg` the aggregation word as configured
    (None for count), `weight` the normalised weight, None when no weight applies.
    """

    name: str
    metric: str
    agg: str | None
    weight: float | None


@dataclass(frozen=True)
class SummarySpec:
    """The `postprocess.summary` block of the configuration (SPEC §2.3, §4.2).

    `metrics` maps a raw column to its aggregations (min/max/mean/avg); `aliases` shortens the
    column in output names (`{agg}_{alias}`); `weights` gives each output a weight, by full output
    name, by metric or alias with a number, or by metric or alias with `{agg: weight}`.
    """

    metrics: Mapping[str, Sequence[str]]
    aliases: Mapping[str, str]
    weights: Mapping[str, float | Mapping[str, float]]
    include_counts: bool = True
    weighted_prefix: str = "w_"

    def __post_init__(self) -> None:
        for metric, aggs in self.metrics.items():
            if isinstance(aggs, str):
                raise ValueError(
                    f"postprocess.summary.metrics.{metric}: expected a list of aggregations "
                    f"such as [{aggs}], got the string {aggs!r}"
                )
        for key, weight in self.weights.items():
            values = weight.items() if isinstance(weight, Mapping) else [(None, weight)]
            for agg, value in values:
                where = f"postprocess.summary.weights.{key}" + (f".{agg}" if agg else "")
                if not _is_number(value) or value < 0:
                    raise ValueError(f"{where}: a weight must be a number ≥ 0, got {value!r}")

    @classmethod
    def default(cls) -> SummarySpec:
        """SPEC §2.3: final_score = 0.4·max_ri + 0.2·max_id_g + 0.2·max_id_l + 0.2·count."""
        return cls(
            metrics={
                "reliability_index": ["max"],
                "identity": ["min", "max", "mean"],
                "identity_sw": ["min", "max", "mean"],
            },
            aliases={"reliability_index": "ri", "identity": "id_g", "identity_sw": "id_l"},
            weights={"reliability_index": {"max": 0.4}, "max_id_g": 0.2, "max_id_l": 0.2, "count": 0.2},
        )

    def columns(self) -> tuple[SummaryColumn, ...]:
        """Score columns in output order (metric outputs in spec order, then count), weights normalised.

        Raises ValueError when two outputs get the same name or when no positive weight applies,
        since final_score would then be undefined.
        """
        planned: list[tuple[str, str, str | None, tuple[str, ...]]] = []
        for metric, aggs in self.metrics.items():
            alias = self.aliases.get(metric, metric)
            for agg in dict.fromkeys(aggs):
                if agg not in AGGREGATIONS:
                    log.warning(
                        "postprocess.summary.metrics.%s: aggregation %r ignored (use one of %s)",
                        metric,
                        agg,
                        ", ".join(AGGREGATIONS),
                    )
                    continue
                planned.append((f"{agg}_{alias}", metric, agg, (metric, alias)))
        if self.include_counts:
            planned.append((COUNT, COUNT, None, (COUNT,)))

        names = [name for name, *_ in planned]
        clashes = sorted({name for name in names if names.count(name) > 1} | {FINAL_SCORE} & set(names))
        if clashes:
            raise ValueError(
                f"postprocess.summary: output names {clashes} are produced twice; change an alias"
            )

        self._warn_unused_weights(planned)
        raw_weights = [_lookup_weight(self.weights, name, keys, agg) for name, _, agg, keys in planned]
        total = sum(w for w in raw_weights if w is not None)
        if total <= 0:
            raise ValueError(
                f"postprocess.summary.weights: no positive weight applies to any of {names}; "
                "final_score needs at least one"
            )
        return tuple(
            SummaryColumn(name, metric, agg, None if w is None else w / total)
            for (name, metric, agg, _), w in zip(planned, raw_weights, strict=True)
        )

    def _warn_unused_weights(self, planned: Sequence[tuple[str, str, str | None, tuple[str, ...]]]) -> None:
        # A misspelt weight key would otherwise silently drop out of the score.
        known = {name for name, *_ in planned} | {key for *_, keys in planned for key in keys}
        known |= {f"{agg}_{metric}" for _, metric, agg, _ in planned if agg is not None}
        for key in self.weights:
            if key not in known:
                log.warning("postprocess.summary.weights.%s matches no summary column; ignored", key)


def column_suffix(model_name: str, layer_index: int | None) -> str:
    """The `{model}_L{layer}` suffix of a partition's summary columns; legacy layers read `Llegacy`.

    Model names are used as they are (spaces, '/', '|' included): only file names are sanitised.
    """
    return f"{model_name}_L{'legacy' if layer_index is None else layer_index}"


def topgo_tables(raw: RawRows) -> dict[tuple[str, int | None, str], pl.DataFrame]:
    """TopGO tables per (model_name, layer_index, category) (SPEC §4.3).

    Each frame has accession, go_id, reliability_index: the best RI of the term for that
    accession within the partition, sorted by accession then go_id. Keys come sorted by model,
    layer (legacy None last), category. Rows without a category or RI cannot be exported and
    are skipped.
    """
    keys = [*PARTITION_KEYS, "category"]
    best = _best_reliability(raw, keys).sort([*keys, *TERM_KEYS], nulls_last=True)
    return {
        (model, layer, category): frame.select(TOPGO_COLUMNS)
        for (model, layer, category), frame in best.partition_by(
            keys, as_dict=True, maintain_order=True
        ).items()
    }


def _best_reliability(raw: RawRows, keys: list[str]) -> pl.DataFrame:
    rows = raw.lazy()
    _require(rows, _TOPGO_REQUIRED, "TopGO")
    return (
        rows.drop_nulls(["category", "reliability_index"])
        .group_by(*keys, *TERM_KEYS)
        .agg(pl.col("reliability_index").max())
        .collect()
    )


def _lookup_weight(
    weights: Mapping[str, float | Mapping[str, float]], name: str, keys: tuple[str, ...], agg: str | None
) -> float | None:
    """SPEC §4.2 order: full output name, then metric/alias → number, then metric/alias → {agg: w}.

    `keys` is (metric, alias): the metric is tried before its alias at each step. A full name may
    also be spelt with the metric (`max_identity` for `max_id_g`); dict lookups accept avg/mean
    for each other.
    """
    full_names = [name] + ([f"{agg}_{keys[0]}"] if agg is not None else [])
    for key in full_names + list(keys):
        if _is_number(weights.get(key)):
            return float(weights[key])
    if agg is None:
        return None
    for key in keys:
        by_agg = weights.get(key)
        if isinstance(by_agg, Mapping):
            for word in (agg, _AGG_SYNONYM.get(agg)):
                if _is_number(by_agg.get(word)):
                    return float(by_agg[word])
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _require(rows: pl.LazyFrame, required: Sequence[str], purpose: str) -> list[str]:
    names = rows.collect_schema().names()
    missing = [c for c in required if c not in names]
    if missing:
        raise ValueError(f"raw rows lack the columns {missing} needed for the {purpose}")
    return names
