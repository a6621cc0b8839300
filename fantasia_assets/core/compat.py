"""FANTASIA 4.1.1's output conventions, for `postprocess.fantasia_compat: true`.

With the option a user who migrates can diff the two tools' outputs to zero. It changes only
how results are written, never which neighbours or terms are found:

- the summary is computed from the raw values as the raw CSV files hold them (rounded to
  `precision` digits, which is what FANTASIA re-reads), each weighted term is rounded to
  `precision` digits, and `final_score` is the sum of those rounded terms;
- per-layer TopGO files keep one line per distinct (accession, GO term, RI as written), where
  ours keep the best RI per term;
- raw shard file names are lower-cased;
- raw shards end with `length_query` and `length_reference` (copies of query_len, ref_len).

Rounding is that of the CSV writer (the exact decimal nearest to the binary value), applied by
writing the values out and reading them back, so a value here is the value a file shows.
"""

from __future__ import annotations

import io

import polars as pl

from .summary import (
    FINAL_SCORE,
    PARTITION_KEYS,
    TERM_KEYS,
    TOPGO_COLUMNS,
    SummarySpec,
    column_suffix,
    summarise,
)

LENGTH_COLUMNS = {"length_query": "query_len", "length_reference": "ref_len"}


def as_written(frame: pl.DataFrame, columns: list[str], precision: int) -> pl.DataFrame:
    """`frame` with its float `columns` replaced by the values a CSV with `precision` digits holds."""
    floats = [c for c in columns if frame.schema[c].is_float()]
    if not floats or not frame.height:
        return frame
    text = frame.select(floats).write_csv(float_precision=precision)
    back = pl.read_csv(io.StringIO(text), schema=dict.fromkeys(floats, pl.Float64))
    return frame.with_columns(back)


def summary(raw: pl.DataFrame, spec: SummarySpec, limit_per_entry: int, precision: int) -> pl.DataFrame:
    """The summary as FANTASIA 4.1.1 writes it: same columns as `summarise`, FANTASIA's arithmetic."""
    columns = spec.columns()
    metrics = sorted({c.metric for c in columns if c.agg is not None and c.metric in raw.columns})
    wide = summarise(as_written(raw, metrics, precision), spec, limit_per_entry)
    weighted = [c for c in columns if c.weight is not None]
    partitions = raw.select(PARTITION_KEYS).unique().rows()
    for model_name, layer_index in partitions:
        suffix = column_suffix(model_name, layer_index)
        final = f"{FINAL_SCORE}_{suffix}"
        terms = {
            f"{spec.weighted_prefix}{c.name}_{suffix}": pl.col(f"{c.name}_{suffix}").fill_null(0.0) * c.weight
            for c in weighted
        }
        wide = as_written(wide.with_columns(**terms), list(terms), precision)
        # a term the partition did not transfer keeps nulls there, as in the exact summary
        absent = pl.col(final).is_null()
        wide = wide.with_columns(
            *(pl.when(absent).then(None).otherwise(pl.col(name)).alias(name) for name in terms),
            pl.when(absent).then(None).otherwise(pl.sum_horizontal(list(terms))).alias(final),
        )
    return wide


def topgo_tables(raw: pl.DataFrame, precision: int) -> dict[tuple[str, int | None, str], pl.DataFrame]:
    """Per-layer TopGO as FANTASIA 4.1.1 writes it: one line per distinct RI of a term.

    Keys and frames as `summary.topgo_tables`; lines sorted by accession, GO id, then RI from the
    highest.
    """
    keys = [*PARTITION_KEYS, "category"]
    rows = as_written(raw.drop_nulls(["category", "reliability_index"]), ["reliability_index"], precision)
    lines = (
        rows.select(*keys, *TOPGO_COLUMNS)
        .unique()
        .sort(
            [*keys, *TERM_KEYS, "reliability_index"],
            descending=[False] * (len(keys) + 2) + [True],
            nulls_last=True,
        )
    )
    return {
        (model, layer, category): frame.select(TOPGO_COLUMNS)
        for (model, layer, category), frame in lines.partition_by(
            keys, as_dict=True, maintain_order=True
        ).items()
    }


def with_length_columns(raw: pl.DataFrame) -> pl.DataFrame:
    """The raw rows with FANTASIA's `length_query` and `length_reference` appended."""
    return raw.with_columns(pl.col(source).alias(name) for name, source in LENGTH_COLUMNS.items())


def shard_names(names: dict[str, str]) -> dict[str, str]:
    """Raw shard file names lower-cased, as FANTASIA writes them.

    Still unique: names that coincide regardless of case already carry a hash of the original
    (`exports.unique_file_names`), and hashed names hold a '~' no plain name has.
    """
    return {accession: name.lower() for accession, name in names.items()}
