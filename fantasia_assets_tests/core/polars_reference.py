"""The polars summary and TopGO ensemble the DuckDB ones replaced: the plain reference they are held to.

This is the in-memory implementation `fantasia_assets.core.aggregate` replaced, kept verbatim
as the straightforward statement of SPEC §4.2/§4.3 that the property tests compare the DuckDB
results with, bit for bit, and that `bench/summary.py` times as "before". One frame holds
every raw row; polars groups and joins them.
"""

from __future__ import annotations

import polars as pl

from fantasia_assets.core.summary import (
    AGGREGATIONS,
    FINAL_SCORE,
    PARTITION_KEYS,
    TERM_KEYS,
    TOPGO_COLUMNS,
    RawRows,
    SummaryColumn,
    SummarySpec,
    _best_reliability,
    _require,
    column_suffix,
)

SUMMARY_REQUIRED = (*TERM_KEYS, *PARTITION_KEYS, "category", "go_description", "protein_id")


def summarise(raw: RawRows, spec: SummarySpec, limit_per_entry: int) -> pl.DataFrame:
    """The wide summary of SPEC §4.2, one row per (accession, go_id), sorted by both.

    Columns: accession, go_id, category, go_description; then for each (model, layer), sorted by
    model name then layer (legacy last), the spec's score columns, weighted columns and
    final_score suffixed `_{model}_L{layer}`; then term_count (raw rows over all partitions) and
    proteins (distinct protein ids, sorted, joined by '|'). A term absent from a partition has
    nulls in that partition's columns. Metrics whose raw column is absent (alignment off) are null
    and count 0 in the score. `count` is rows / limit_per_entry.
    """
    if limit_per_entry < 1:
        raise ValueError(f"limit_per_entry must be ≥ 1 to normalise counts, got {limit_per_entry}")
    rows = raw.lazy()
    present = set(_require(rows, SUMMARY_REQUIRED, "summary"))
    columns = spec.columns()
    weighted = [c for c in columns if c.weight is not None]

    scores = (
        rows.group_by(*TERM_KEYS, *PARTITION_KEYS)
        .agg(_aggregate(c, present, limit_per_entry).alias(c.name) for c in columns)
        .with_columns(
            (pl.col(c.name).fill_null(0.0) * c.weight).alias(spec.weighted_prefix + c.name) for c in weighted
        )
        .with_columns(pl.sum_horizontal(spec.weighted_prefix + c.name for c in weighted).alias(FINAL_SCORE))
        .collect()
    )
    score_names = [
        *(c.name for c in columns),
        *(spec.weighted_prefix + c.name for c in weighted),
        FINAL_SCORE,
    ]

    # Filtering, sorting and joining inside the group_by would run per group, which is several
    # times slower on millions of small groups; list kernels after it run over all groups at once.
    terms = (
        rows.group_by(*TERM_KEYS)
        .agg(
            pl.col("category").first(ignore_nulls=True),
            pl.col("go_description").first(ignore_nulls=True),
            pl.len().alias("term_count"),
            pl.col("protein_id").unique().alias("proteins"),
        )
        .with_columns(pl.col("proteins").list.drop_nulls().list.sort().list.join("|"))
    )

    partitions = scores.select(PARTITION_KEYS).unique().sort(PARTITION_KEYS, nulls_last=True)
    wide_names: list[str] = []
    for model_name, layer_index in partitions.iter_rows():
        suffix = column_suffix(model_name, layer_index)
        renamed = {name: f"{name}_{suffix}" for name in score_names}
        partition = scores.lazy().filter(
            pl.col("model_name") == model_name, pl.col("layer_index").eq_missing(layer_index)
        )
        terms = terms.join(
            partition.select(*TERM_KEYS, *(pl.col(n).alias(w) for n, w in renamed.items())),
            on=list(TERM_KEYS),
            how="left",
        )
        wide_names.extend(renamed.values())

    ordered = [*TERM_KEYS, "category", "go_description", *wide_names, "term_count", "proteins"]
    if len(set(ordered)) != len(ordered):
        clashes = sorted({n for n in ordered if ordered.count(n) > 1})
        raise ValueError(f"summary columns {clashes} collide between model names; rename a model or an alias")
    return terms.select(ordered).sort(TERM_KEYS).collect()


def topgo_ensemble(raw: RawRows) -> dict[str, pl.DataFrame]:
    """TopGO tables per category, keeping the best RI of each (accession, go_id) over all models and layers.

    Frames have accession, go_id, reliability_index, sorted by accession then go_id; keys sorted.
    """
    best = _best_reliability(raw, ["category"]).sort(["category", *TERM_KEYS])
    return {
        category: frame.select(TOPGO_COLUMNS)
        for (category,), frame in best.partition_by("category", as_dict=True, maintain_order=True).items()
    }


def _aggregate(column: SummaryColumn, present: set[str], limit_per_entry: int) -> pl.Expr:
    if column.agg is None:
        return pl.len() / limit_per_entry
    if column.metric not in present:
        # Alignment off: the metric columns are not written at all; the score treats them as 0.
        return pl.lit(None, dtype=pl.Float64)
    values = pl.col(column.metric).cast(pl.Float64)
    return getattr(values, AGGREGATIONS[column.agg])()
