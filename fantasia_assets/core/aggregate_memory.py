"""The run-wide summary and TopGO ensemble of small runs, in memory: DuckDB's results without DuckDB.

`core.aggregate` computes summary.csv and the ensemble out of core, but starting DuckDB, planning
its SQL and streaming the result cost about half a second however few the raw rows are: most
of a small run's post-search time. Below `IN_MEMORY_ROWS` raw rows the partitions' Parquet is
read into polars and the same values are computed with every order of evaluation that
`core.aggregate` fixes, fixed the same way, so that the files are equal byte for byte (a test
compares both on hostile rows):

- **means** are Kahan sums of the group's non-null values in ascending order (NaN last, as
  DuckDB's `list_sort` puts it), from (0, 0), divided by the non-null count; the sums run
  position by position over all groups at once;
- **min / max** skip NaN unless every value is NaN and settle ±0.0 ties by IEEE 754's
  totalOrder, as `summary.extreme` and `aggregate._extreme` do;
- **count** is rows × (1 / limit_per_entry); **weighted** columns are coalesce(score, 0) × weight,
  and **final_score** their sum as the same balanced tree;
- **first** category and description are the earliest non-null ones in partition order, then
  file order; **proteins** the distinct ids sorted bytewise, joined by '|';
- a term's per-partition columns come from a join on (accession, go_id) in which null keys
  match nothing, as SQL's `=` does.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from . import exports
from .aggregate import (
    _SUMMARY_REQUIRED,
    _TOPGO_REQUIRED,
    BATCH_ROWS,
    RawRowsError,
    SummaryFile,
    _score_names,
    _summary_names,
)
from .summary import (
    AGGREGATIONS,
    PARTITION_KEYS,
    TERM_KEYS,
    TOPGO_COLUMNS,
    SummaryColumn,
    SummarySpec,
    extreme,
)

# Raw rows up to which the run-wide outputs are aggregated in memory (about 0.3 KiB a row with
# the summary's columns); above it DuckDB works out of core under its memory limit.
IN_MEMORY_ROWS = 2_000_000
_GROUP = "_group"
_PART = "_part"
_TERM = "_term"


def row_count(files: Sequence[Path]) -> int:
    """The raw rows of these Parquet files, from their footers."""
    return sum(pl.scan_parquet(f).select(pl.len()).collect().item() for f in files)


def read_rows(
    files: Sequence[Path], wanted: Sequence[str], required: Sequence[str], purpose: str
) -> pl.DataFrame:
    """The `wanted` columns that exist in any of `files`, in file then row order.

    A column missing from one file reads as null there (DuckDB's `union_by_name`); a `required`
    one missing from all of them is an error naming it.
    """
    missing_files = [str(f) for f in files if not Path(f).is_file()]
    if not files or missing_files:
        raise RawRowsError(f"raw_rows: Parquet files missing: {', '.join(missing_files) or 'none given'}")
    schemas = [pl.read_parquet_schema(f) for f in files]
    present = {name for schema in schemas for name in schema}
    missing = [c for c in required if c not in present]
    if missing:
        raise RawRowsError(f"raw_rows lack the columns {missing} needed for the {purpose}")
    frames = [
        pl.read_parquet(f, columns=[c for c in wanted if c in schema])
        for f, schema in zip(files, schemas, strict=True)
    ]
    return pl.concat(frames, how="diagonal_relaxed")


def summary_frame(
    files: Sequence[Path], spec: SummarySpec, limit_per_entry: int
) -> tuple[list[str], pl.DataFrame]:
    """`core.aggregate.summary_batches` of these raw rows Parquet files, as one frame."""
    if limit_per_entry < 1:
        raise ValueError(f"limit_per_entry must be ≥ 1 to normalise counts, got {limit_per_entry}")
    columns = spec.columns()
    metrics = list(dict.fromkeys(c.metric for c in columns if c.agg is not None))
    rows = read_rows(files, [*_SUMMARY_REQUIRED, *metrics], _SUMMARY_REQUIRED, "summary")
    present = set(rows.columns)
    partitions = rows.select(PARTITION_KEYS).unique().sort(PARTITION_KEYS, nulls_last=True)
    names = _summary_names(spec, columns, partitions.rows())
    score_names = _score_names(spec, columns)

    # one stable sort by term puts each term's rows together in file order: a term is then a
    # run, numbered in output order (`_TERM`), and everything after groups or joins by that
    # integer instead of hashing the two strings again (several times cheaper)
    rows = rows.sort(TERM_KEYS, nulls_last=False, maintain_order=True)
    accession, go_id = rows["accession"], rows["go_id"]
    same = accession.eq_missing(accession.shift(1)) & go_id.eq_missing(go_id.shift(1))
    starts = np.flatnonzero(~same.to_numpy())
    if rows.height and (not len(starts) or starts[0]):  # the first row starts a term, null keys too
        starts = np.concatenate([[0], starts])
    term = np.zeros(rows.height, dtype=np.int64)
    term[starts[1:]] = 1
    term = np.cumsum(term)
    rows = rows.with_columns(pl.Series(_TERM, term))
    terms = rows[starts].select(TERM_KEYS)
    lengths = np.diff(np.append(starts, rows.height))
    firsts = [_first_present(rows[column], term, starts) for column in ("category", "go_description")]
    # SQL's `=` matches no null key: such a term has no per-partition values
    keyed = terms.select(pl.all_horizontal(pl.col(TERM_KEYS).is_not_null()).alias("keyed"))["keyed"]
    scores = _scores(rows, spec, columns, present, limit_per_entry, (lengths == 1)[term])
    scores = scores.filter(pl.Series(keyed.to_numpy()[scores[_TERM].to_numpy()]))
    index = pl.DataFrame({_TERM: np.arange(len(starts), dtype=np.int64)})
    wide = [terms, pl.DataFrame(firsts)]
    for part in range(partitions.height):
        block = scores.filter(pl.col(_PART) == part).select(_TERM, *score_names)
        joined = index.join(block, on=_TERM, how="left", maintain_order="left")
        wide.append(joined.select(pl.col(n).alias(f"{n}#{part}") for n in score_names))
    proteins = _proteins(rows, term, starts, lengths)
    wide.append(pl.DataFrame({"term_count": lengths.astype(np.int64), "proteins": proteins}))
    frame = pl.concat(wide, how="horizontal")
    return names, frame.rename(dict(zip(frame.columns, names, strict=True)))


def _first_present(values: pl.Series, term: np.ndarray, starts: np.ndarray) -> pl.Series:
    """Each term's first non-null value; `values` sorted stably by term (so in file order),
    `term` the term of each row, `starts` the first row of each."""
    if not values.null_count():
        return values.gather(starts)
    present = np.flatnonzero(values.is_not_null().to_numpy())
    first = present[np.diff(term[present], prepend=-1) != 0]  # the first present row of a term
    return pl.Series(values.name, [None] * len(starts), dtype=values.dtype).scatter(
        term[first], values.gather(first)
    )


def _proteins(rows: pl.DataFrame, term: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> pl.Series:
    """Each term's distinct protein ids sorted bytewise and joined by '|' ('' for none).

    A term of one row (most of them) is that row's id; only the others are grouped, sorted and
    joined (sorting and joining inside 500,000 lists costs several times more)."""
    joined = rows["protein_id"].gather(starts).fill_null("").alias("proteins")
    several = lengths > 1
    if not several.any():
        return joined
    joined = joined.scatter(np.flatnonzero(several), "")  # a term whose ids are all null stays ''
    pairs = rows.filter(pl.Series(several[term])).select(_TERM, pl.col("protein_id").alias("value"))
    pairs = pairs.drop_nulls("value").unique().sort(_TERM, "value")
    grouped = pairs.group_by(_TERM, maintain_order=True).agg(pl.col("value").str.join("|"))
    return joined.scatter(grouped[_TERM], grouped["value"]) if grouped.height else joined


def _scores(
    rows: pl.DataFrame,
    spec: SummarySpec,
    columns: Sequence[SummaryColumn],
    present: set[str],
    limit: int,
    alone: np.ndarray,
) -> pl.DataFrame:
    """One row per (term, model, layer): the term's number (`_TERM`), the partition's index,
    scores, weighted, final. `alone`: per row, whether its term has no other row (most terms):
    such a row is its own group, whose scores are computed row by row with the same arithmetic
    as a group's (the scores of 499,800 raw rows: 0.31 s of CPU grouping every row, 0.18 s so)."""
    parts = rows.select(PARTITION_KEYS).unique().sort(PARTITION_KEYS, nulls_last=True)
    parts = parts.with_row_index(_PART).with_columns(pl.col(_PART).cast(pl.Int64))
    keyed = rows.join(parts, on=list(PARTITION_KEYS), how="left", nulls_equal=True, maintain_order="left")
    mask = pl.Series(alone)
    scores = [f"s{i}" for i in range(len(columns))]
    groups = pl.concat(
        [
            keyed.filter(mask).select(_TERM, _PART, *_single_scores(columns, present, limit)),
            _group_scores(keyed.filter(~mask), columns, present, limit).select(_TERM, _PART, *scores),
        ]
    )
    weighted = [(i, c.weight) for i, c in enumerate(columns) if c.weight is not None]
    terms = [pl.col(f"s{i}").fill_null(0.0) * weight for i, weight in weighted]
    names = _score_names(spec, columns)
    return groups.select(
        _TERM,
        _PART,
        *(pl.col(f"s{i}").alias(names[i]) for i in range(len(columns))),
        *(term.alias(names[len(columns) + j]) for j, term in enumerate(terms)),
        _tree_sum(terms).alias(names[-1]),
    )


def _group_scores(
    keyed: pl.DataFrame, columns: Sequence[SummaryColumn], present: set[str], limit: int
) -> pl.DataFrame:
    """The scores `s{i}` of each (term, partition) group of `keyed`."""
    means = [m for m in dict.fromkeys(c.metric for c in columns) if m in present and _has_mean(m, columns)]
    aggregations: list[pl.Expr] = [pl.len().alias("_rows")]
    for i, column in enumerate(columns):
        if column.agg is None:
            aggregations.append((pl.len().cast(pl.Float64) * (1.0 / limit)).alias(f"s{i}"))
        elif column.metric not in present:
            aggregations.append(pl.lit(None, dtype=pl.Float64).alias(f"s{i}"))
        elif AGGREGATIONS[column.agg] in ("min", "max"):
            values = pl.col(column.metric).cast(pl.Float64)
            aggregations.append(extreme(values, AGGREGATIONS[column.agg]).alias(f"s{i}"))
    for j, metric in enumerate(means):
        aggregations.append(pl.col(metric).cast(pl.Float64).drop_nulls().alias(f"l{j}"))
    groups = keyed.group_by(_TERM, _PART).agg(aggregations)
    mean_of = {metric: _kahan_means(groups[f"l{j}"]) for j, metric in enumerate(means)}
    return groups.with_columns(
        mean_of[c.metric].alias(f"s{i}")
        for i, c in enumerate(columns)
        if c.agg is not None and c.metric in mean_of and AGGREGATIONS[c.agg] == "mean"
    )


def _single_scores(columns: Sequence[SummaryColumn], present: set[str], limit: int) -> list[pl.Expr]:
    """`_group_scores` of one-row groups, row by row: a count is 1.0 × (1 / limit); min and max
    are the value itself (NaN and null included: what skipping NaN unless all are NaN leaves of
    one value); a mean is the Kahan sum from (0, 0) of the one value over 1, `(0 + (v − 0)) / 1`
    (so −0.0 becomes 0.0, as there), null for a null value (test_aggregate_memory: −0.0 too)."""
    scores = []
    for i, column in enumerate(columns):
        values = pl.col(column.metric).cast(pl.Float64) if column.metric in present else None
        if column.agg is None:
            score = pl.lit(1.0, dtype=pl.Float64) * (1.0 / limit)
        elif values is None:
            score = pl.lit(None, dtype=pl.Float64)
        elif AGGREGATIONS[column.agg] == "mean":
            # (0 + (v − 0)) / 1 is v except for ±0.0, which give 0.0 (written out: polars drops
            # the additions of 0.0, which is not exact for −0.0)
            score = pl.when(values == 0.0).then(pl.lit(0.0, dtype=pl.Float64)).otherwise(values)
        else:
            score = values
        scores.append(score.alias(f"s{i}"))
    return scores


def _has_mean(metric: str, columns: Sequence[SummaryColumn]) -> bool:
    return any(c.metric == metric and c.agg is not None and AGGREGATIONS[c.agg] == "mean" for c in columns)


def _tree_sum(terms: Sequence[pl.Expr]) -> pl.Expr:
    """The sum as `core.aggregate._tree_sum` nests it: first half + second half, recursively."""
    if len(terms) == 1:
        return terms[0]
    half = len(terms) // 2
    return _tree_sum(terms[:half]) + _tree_sum(terms[half:])


def _kahan_means(lists: pl.Series) -> pl.Series:
    """Per group, the Kahan sum of its non-null values in ascending order (NaN last) from (0, 0)
    over their count; null where a group has no value."""
    lengths = lists.list.len().to_numpy().astype(np.int64)
    flat = np.zeros(0)
    if lengths.sum():
        # one stable sort of all values by (group, value) instead of one per group: NaN last,
        # equal values (±0.0) left in list order. polars' multithreaded sort, ≈ 14× numpy's
        # stable argsort by value then by group (500,000 values: 15 ms against 211 ms), with
        # the same order bit for bit (test_aggregate_memory)
        group = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
        values = pl.DataFrame({"group": group, "value": lists.explode()})
        flat = values.sort(["group", "value"], maintain_order=True)["value"].to_numpy()
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    # groups longest first, so that those with a value at each position are a prefix
    order = np.argsort(-lengths, kind="stable")
    first = starts[order]
    total = np.zeros(len(lengths))
    carry = np.zeros(len(lengths))
    longest = int(lengths.max(initial=0))
    live_counts = np.searchsorted(-lengths[order], -np.arange(longest), side="left")
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):  # inf and NaN as SQL gives them
        for position in range(longest):
            live = live_counts[position]
            y = flat[first[:live] + position] - carry[:live]
            t = total[:live] + y
            carry[:live] = (t - total[:live]) - y
            total[:live] = t
        means = np.empty(len(lengths))
        means[order] = total / lengths[order]
    return pl.Series(means).scatter(np.flatnonzero(lengths == 0), None)


def write_summary(
    files: Sequence[Path], spec: SummarySpec, limit_per_entry: int, path: Path, precision: int
) -> SummaryFile:
    """summary.csv of these raw rows, the bytes `core.aggregate.write_summary` writes."""
    names, frame = summary_frame(files, spec, limit_per_entry)

    def chunks() -> Iterator[bytes]:
        yield exports.csv_bytes(pl.DataFrame(schema=dict.fromkeys(names, pl.String)), precision)
        for start in range(0, frame.height, BATCH_ROWS):
            yield exports.csv_bytes(frame.slice(start, BATCH_ROWS), precision, header=False)

    exports.write_chunks_atomic(path, chunks())
    return SummaryFile(path, frame.height, tuple(names))


def ensemble_tables(files: Sequence[Path]) -> dict[str, pl.DataFrame]:
    """`core.aggregate.ensemble_tables` of these raw rows Parquet files."""
    rows = read_rows(files, _TOPGO_REQUIRED, _TOPGO_REQUIRED, "TopGO ensemble")
    ri = pl.col("reliability_index").cast(pl.Float64)
    best = (
        rows.filter(pl.col("category").is_not_null(), pl.col("reliability_index").is_not_null())
        .group_by("category", *TERM_KEYS)
        .agg(extreme(ri, "max").alias("reliability_index"))
        .sort(["category", *TERM_KEYS], nulls_last=False)
    )
    return {
        category: frame.select(TOPGO_COLUMNS)
        for (category,), frame in best.partition_by("category", as_dict=True, maintain_order=True).items()
    }
