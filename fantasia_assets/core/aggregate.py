"""Cross-partition aggregation in DuckDB: summary.csv and the TopGO ensemble from the partitions' Parquet.

Every (model, layer) writes its raw rows as Parquet (`parquet/{model}/layer_{k}/raw_rows.parquet`);
the run-wide outputs group them all. DuckDB reads them out of core under a memory limit,
spilling to a private scratch folder, and streams the result to the output file, so the
memory a summary needs no longer grows with the raw rows. `parquet_connection` is the entry
point for any run-wide SQL (the evaluation reads predictions through it too).

The results are those of the polars implementation this replaced (`core.summary.summarise`,
still used by the FANTASIA-compatible mode; a property test holds the two together), with every order of
evaluation that SQL and parallel engines leave free fixed, so that a re-run is identical:

- **weighted scores** add up as a balanced tree (first half, then second half, recursively),
  the order polars' `sum_horizontal` reduces its columns in: bit for bit polars' result;
- **count** is rows × (1 / limit_per_entry), as polars evaluates `len / k`: bit for bit;
- **first** category and description of a term are those of its earliest raw row
  (partition order, then file order), as polars' `first`: bit for bit;
- **means** are Kahan-compensated sums of the group's values in ascending order, divided by
  the non-null count. polars adds them in an order of its engine's choosing, which changes
  with the number of rows and threads (neither row order nor value order reproduces it), so
  the two may differ in the last bit of a mean; the written text differs only when a mean
  sits exactly on a rounding tie of `precision` digits (bench/summary.py: 1 line in 398,117).

Rows carry `row_order` (file index, row in file), every "first" is an `arg_min` over it, and
the output is sorted on unique keys: nothing depends on thread scheduling.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from fantasia_assets.errors import FantasiaError

from . import exports
from .summary import (
    AGGREGATIONS,
    FINAL_SCORE,
    PARTITION_KEYS,
    TERM_KEYS,
    TOPGO_COLUMNS,
    SummaryColumn,
    SummarySpec,
    column_suffix,
)

if TYPE_CHECKING:  # imported where a connection is opened: a small run aggregates without DuckDB
    import duckdb

RAW_ROWS = "raw_rows"
ROW_ORDER = "row_order"
# DuckDB's own buffers; Python holds one output batch besides. Measured by bench/summary.py.
MEMORY_LIMIT = "1GB"
BATCH_ROWS = 100_000
# Kahan steps written out as projections; a group with more values takes the (slower) list_reduce
_UNROLLED = 8

_SUMMARY_REQUIRED = (*TERM_KEYS, *PARTITION_KEYS, "category", "go_description", "protein_id")
_TOPGO_REQUIRED = (*TERM_KEYS, "category", "reliability_index")


class RawRowsError(FantasiaError, ValueError):
    """The partitions' raw rows cannot be aggregated (none given, or a column missing)."""


@dataclass(frozen=True)
class SummaryFile:
    """What `write_summary` wrote: the file, its data rows and its columns in order."""

    path: Path
    rows: int
    columns: tuple[str, ...]


@contextmanager
def parquet_connection(
    views: Mapping[str, Sequence[Path]],
    spill: Path,
    memory_limit: str = MEMORY_LIMIT,
    threads: int | None = None,
) -> Iterator[duckdb.DuckDBPyConnection]:
    """An in-memory DuckDB with one view per entry of `views` over those Parquet files.

    Files are read in the order given, their columns unified by name (a column missing from
    one file reads as null there); each view adds `row_order`, a BIGINT that orders rows by
    file then by row within the file. DuckDB keeps to `memory_limit` and spills to the folder
    `spill`, which must not exist yet (so that concurrent runs never share spill files): it is
    created here and removed on exit.
    """
    for name, files in views.items():
        if not files:
            raise RawRowsError(f"no Parquet files to read as {name}")
        missing = [str(f) for f in files if not Path(f).is_file()]
        if missing:
            raise RawRowsError(f"{name}: Parquet files missing: {', '.join(missing)}")
    spill.mkdir(parents=True)
    settings = {"memory_limit": memory_limit, "temp_directory": str(spill)}
    if threads is not None:
        settings["threads"] = threads
    import duckdb

    connection = duckdb.connect(config=settings)
    try:
        for name, files in views.items():
            relation = connection.read_parquet([str(f) for f in files], union_by_name=True)
            # 2^40 rows per file leaves room for any Parquet file and 2^23 files
            relation.project(f"*, (file_index::BIGINT << 40) + file_row_number AS {ROW_ORDER}").to_view(name)
        yield connection
    finally:
        connection.close()
        shutil.rmtree(spill, ignore_errors=True)


def columns_of(connection: duckdb.DuckDBPyConnection, view: str) -> list[str]:
    return [row[0] for row in connection.sql(f"DESCRIBE {_ident(view)}").fetchall()]


def _require(
    connection: duckdb.DuckDBPyConnection, view: str, required: Sequence[str], purpose: str
) -> set[str]:
    names = columns_of(connection, view)
    missing = [c for c in required if c not in names]
    if missing:
        raise RawRowsError(f"{view} lack the columns {missing} needed for the {purpose}")
    return set(names)


# ---------------------------------------------------------------------------------------------
# summary.csv


def write_summary(
    connection: duckdb.DuckDBPyConnection,
    spec: SummarySpec,
    limit_per_entry: int,
    path: Path,
    precision: int,
    view: str = RAW_ROWS,
) -> SummaryFile:
    """summary.csv (SPEC §4.2) of every raw row in `view`, written atomically batch by batch.

    Floats are written with `precision` digits, by the same CSV writer as every other output.
    """
    names, batches = summary_batches(connection, spec, limit_per_entry, view)
    rows = 0

    def chunks() -> Iterator[bytes]:
        nonlocal rows
        yield exports.csv_bytes(pl.DataFrame(schema=dict.fromkeys(names, pl.String)), precision)
        for frame in batches:
            rows += frame.height
            yield exports.csv_bytes(frame, precision, header=False)

    exports.write_chunks_atomic(path, chunks())
    return SummaryFile(path, rows, tuple(names))


def summary_batches(
    connection: duckdb.DuckDBPyConnection, spec: SummarySpec, limit_per_entry: int, view: str = RAW_ROWS
) -> tuple[list[str], Iterator[pl.DataFrame]]:
    """The summary's column names, and its rows as polars frames of at most BATCH_ROWS rows.

    One row per (accession, go_id), sorted by both: accession, go_id, category, go_description;
    then for each (model, layer), sorted by model name then layer (legacy last), the spec's
    score columns, weighted columns and final_score suffixed `_{model}_L{layer}`; then
    term_count (raw rows over all partitions) and proteins (distinct protein ids, sorted,
    joined by '|'). A term absent from a partition has nulls in that partition's columns.
    Metrics whose raw column is absent (alignment off) are null and count 0 in the score.
    `count` is rows / limit_per_entry.
    """
    if limit_per_entry < 1:
        raise ValueError(f"limit_per_entry must be ≥ 1 to normalise counts, got {limit_per_entry}")
    present = _require(connection, view, _SUMMARY_REQUIRED, "summary")
    columns = spec.columns()
    partitions = connection.execute(
        f"SELECT DISTINCT model_name, layer_index FROM {_ident(view)} "
        "ORDER BY model_name NULLS LAST, layer_index NULLS LAST"
    ).fetchall()
    names = _summary_names(spec, columns, partitions)
    query, params = _summary_query(spec, columns, partitions, present, limit_per_entry, view)
    reader = connection.sql(query, params=params).to_arrow_reader(BATCH_ROWS)

    def frames() -> Iterator[pl.DataFrame]:
        for batch in reader:
            yield pl.from_arrow(batch).rename(dict(zip(batch.schema.names, names, strict=True)))

    return names, frames()


def _summary_names(
    spec: SummarySpec, columns: Sequence[SummaryColumn], partitions: Sequence[tuple[str, int | None]]
) -> list[str]:
    scores = _score_names(spec, columns)
    wide = [f"{name}_{column_suffix(model, layer)}" for model, layer in partitions for name in scores]
    ordered = [*TERM_KEYS, "category", "go_description", *wide, "term_count", "proteins"]
    if len(set(ordered)) != len(ordered):
        clashes = sorted({n for n in ordered if ordered.count(n) > 1})
        raise ValueError(f"summary columns {clashes} collide between model names; rename a model or an alias")
    return ordered


def _score_names(spec: SummarySpec, columns: Sequence[SummaryColumn]) -> list[str]:
    weighted = [c for c in columns if c.weight is not None]
    return [*(c.name for c in columns), *(spec.weighted_prefix + c.name for c in weighted), FINAL_SCORE]


def _summary_query(
    spec: SummarySpec,
    columns: Sequence[SummaryColumn],
    partitions: Sequence[tuple[str, int | None]],
    present: set[str],
    limit_per_entry: int,
    view: str,
) -> tuple[str, dict]:
    """The summary as one SELECT, and its bound parameters.

    Data reaches SQL only as bound parameters or as quoted identifiers of columns that exist;
    output columns are positional (`c0`, `c1`, …) and named in Python.
    """
    params: dict[str, object] = {}  # DuckDB refuses parameters the query does not use
    metrics = [m for m in dict.fromkeys(c.metric for c in columns if c.agg is not None) if m in present]
    value = {m: f"CAST({_ident(m)} AS DOUBLE)" for m in metrics}
    means = [m for m in metrics if any(c.metric == m and AGGREGATIONS.get(c.agg) == "mean" for c in columns)]

    per_group = []  # stage 1: one row per (accession, go_id, model, layer)
    for i, column in enumerate(columns):
        if column.agg is None:
            # polars evaluates `len / k` as len × (1 / k): the same rounding here
            params["per_entry"] = 1.0 / limit_per_entry
            per_group.append(f"CAST(count(*) AS DOUBLE) * $per_entry AS s{i}")
        elif column.metric not in present:
            # alignment off: the metric columns are not written at all; the score treats them as 0
            per_group.append(f"CAST(NULL AS DOUBLE) AS s{i}")
        elif column.agg in ("min", "max"):
            per_group.append(_extreme(value[column.metric], column.agg) + f" AS s{i}")
    for j, metric in enumerate(means):
        # the group's values in ascending order (nulls included), and how many are not null
        per_group.append(f"list_sort(list({value[metric]})) AS l{j}")
        per_group.append(f"count({value[metric]}) AS n{j}")
    part = " ".join(
        f"WHEN model_name IS NOT DISTINCT FROM $model{p} AND layer_index IS NOT DISTINCT FROM $layer{p} THEN {p}"
        for p in range(len(partitions))
    )
    for p, (model, layer) in enumerate(partitions):
        params[f"model{p}"], params[f"layer{p}"] = model, layer

    # Kahan sums, unrolled over the first _UNROLLED list positions (one projection each, vectorised);
    # a longer group takes list_reduce: the same sum, far slower per row.
    kahan = [
        f"kahan0 AS (SELECT *{''.join(f', 0::DOUBLE AS ks{j}, 0::DOUBLE AS kc{j}' for j in range(len(means)))} FROM groups)"
    ]
    for k in range(1, _UNROLLED + 1):
        steps = []
        for j in range(len(means)):
            y = f"(l{j}[{k}] - kc{j})"
            steps.append(
                f"coalesce(ks{j} + {y}, ks{j}) AS ks{j}, coalesce(((ks{j} + {y}) - ks{j}) - {y}, kc{j}) AS kc{j}"
            )
        kahan.append(
            f"kahan{k} AS (SELECT * REPLACE ({', '.join(steps)}) FROM kahan{k - 1})"
            if steps
            else f"kahan{k} AS (SELECT * FROM kahan{k - 1})"
        )
    mean_of = {
        metric: (
            f"CASE WHEN n{j} = 0 THEN NULL WHEN len(l{j}) <= {_UNROLLED} THEN ks{j} / n{j} "
            f"ELSE {_kahan_reduce(f'l{j}')} / n{j} END"
        )
        for j, metric in enumerate(means)
    }
    scores = [
        f"{mean_of[c.metric]} AS s{i}"
        if c.metric in mean_of and AGGREGATIONS.get(c.agg) == "mean"
        else f"s{i}"
        for i, c in enumerate(columns)
    ]

    weighted = []
    for i, column in enumerate(columns):
        if column.weight is not None:
            params[f"w{i}"] = column.weight
            weighted.append(f"coalesce(s{i}, CAST(0 AS DOUBLE)) * $w{i}")
    outputs = [f"s{i}" for i in range(len(columns))]
    outputs += [f"{w} AS v{j}" for j, w in enumerate(weighted)]
    outputs.append(f"{_tree_sum([f'({w})' for w in weighted])} AS final")
    score_list = [f"s{i}" for i in range(len(columns))] + [f"v{j}" for j in range(len(weighted))] + ["final"]
    pivoted, joins = [], []
    for p in range(len(partitions)):
        pivoted += [f"p{p}.{score} AS c{p * len(score_list) + k}" for k, score in enumerate(score_list)]
        joins.append(
            f"LEFT JOIN weighted AS p{p} ON p{p}.part = {p} AND p{p}.accession = t.accession "
            f"AND p{p}.go_id = t.go_id"
        )
    query = f"""
        WITH groups AS (
            SELECT accession, go_id, CASE {part} END AS part,
                   count(*) AS n_rows,
                   arg_min(category, {ROW_ORDER}) FILTER (WHERE category IS NOT NULL) AS category,
                   min({ROW_ORDER}) FILTER (WHERE category IS NOT NULL) AS category_at,
                   arg_min(go_description, {ROW_ORDER}) FILTER (WHERE go_description IS NOT NULL)
                       AS go_description,
                   min({ROW_ORDER}) FILTER (WHERE go_description IS NOT NULL) AS go_description_at,
                   list(protein_id) FILTER (WHERE protein_id IS NOT NULL) AS proteins
                   {"".join(", " + a for a in per_group)}
            FROM {_ident(view)}
            GROUP BY accession, go_id, model_name, layer_index
        ),
        {", ".join(kahan)},
        scored AS (
            SELECT accession, go_id, part, n_rows, category, category_at, go_description,
                   go_description_at, proteins, {", ".join(scores)}
            FROM kahan{_UNROLLED}
        ),
        weighted AS MATERIALIZED (
            SELECT accession, go_id, part, n_rows, category, category_at, go_description,
                   go_description_at, proteins, {", ".join(outputs)}
            FROM scored
        ),
        terms AS (
            SELECT accession, go_id,
                   arg_min(category, category_at) AS category,
                   arg_min(go_description, go_description_at) AS go_description,
                   sum(n_rows)::BIGINT AS term_count,
                   coalesce(array_to_string(list_sort(list_distinct(flatten(list(proteins)))), '|'), '')
                       AS proteins
            FROM weighted
            GROUP BY accession, go_id
        )
        SELECT t.accession, t.go_id, t.category, t.go_description
               {"".join(", " + c for c in pivoted)}, t.term_count, t.proteins
        FROM terms AS t {" ".join(joins)}
        ORDER BY t.accession NULLS FIRST, t.go_id NULLS FIRST
    """
    return query, params


def _extreme(value: str, which: str) -> str:
    """SQL for `summary.extreme`: NaN skipped unless every value is NaN (DuckDB's max takes NaN
    as the largest value), ±0.0 ties settled by totalOrder rather than by the order of rows."""
    top = f"coalesce({which}({value}) FILTER (WHERE NOT isnan({value})), {which}({value}))"
    sign, zero = ("NOT signbit", "abs") if which == "max" else ("signbit", "-abs")
    return (
        f"CASE WHEN {top} = 0 AND bool_or({value} = 0 AND {sign}({value})) THEN {zero}({top}) ELSE {top} END"
    )


def _kahan_reduce(values: str) -> str:
    """Kahan sum of a list's non-null values in list order, from (0, 0)."""
    step = "(b.s - a.c)"
    return (
        f"list_reduce(list_transform(list_filter({values}, lambda x: x IS NOT NULL), "
        "lambda x: {'s': x, 'c': 0::DOUBLE}), "
        f"lambda a, b: {{'s': a.s + {step}, 'c': ((a.s + {step}) - a.s) - {step}}}, "
        "{'s': 0::DOUBLE, 'c': 0::DOUBLE}).s"
    )


def _tree_sum(terms: Sequence[str]) -> str:
    if len(terms) == 1:
        return terms[0]
    half = len(terms) // 2
    return f"({_tree_sum(terms[:half])} + {_tree_sum(terms[half:])})"


# ---------------------------------------------------------------------------------------------
# TopGO ensemble


def ensemble_tables(connection: duckdb.DuckDBPyConnection, view: str = RAW_ROWS) -> dict[str, pl.DataFrame]:
    """TopGO tables per category: the best RI of each (accession, go_id) over every model and layer.

    Frames have accession, go_id, reliability_index, sorted by accession then go_id; keys
    sorted. Rows without a category or RI cannot be exported and are skipped.
    """
    _require(connection, view, _TOPGO_REQUIRED, "TopGO ensemble")
    ri = "CAST(reliability_index AS DOUBLE)"
    best = pl.from_arrow(
        connection.sql(
            f"""
            SELECT category, accession, go_id, {_extreme(ri, "max")} AS reliability_index
            FROM {_ident(view)}
            WHERE category IS NOT NULL AND reliability_index IS NOT NULL
            GROUP BY category, accession, go_id
            ORDER BY category, accession NULLS FIRST, go_id NULLS FIRST
            """
        ).to_arrow_table()
    )
    return {
        category: frame.select(TOPGO_COLUMNS)
        for (category,), frame in best.partition_by("category", as_dict=True, maintain_order=True).items()
    }


def _ident(name: str) -> str:
    """A quoted SQL identifier: column and view names are never spliced in raw."""
    return '"' + name.replace('"', '""') + '"'


# ---------------------------------------------------------------------------------------------
# small run-wide reads


def reference_ids(connection: duckdb.DuckDBPyConnection, view: str = RAW_ROWS) -> pl.DataFrame:
    """The distinct `ref_idx` of every raw row (the references sequences.fasta lists), sorted."""
    _require(connection, view, ("ref_idx",), "reference list")
    return pl.from_arrow(
        connection.sql(f"SELECT DISTINCT ref_idx FROM {_ident(view)} ORDER BY ref_idx").to_arrow_table()
    )


def top_predictions(connection: duckdb.DuckDBPyConnection, limit: int, view: str = RAW_ROWS) -> pl.DataFrame:
    """The `limit` best (accession, GO term, category, description) by RI, with the first protein.

    Columns accession, go_id, category, go_description, reliability_index (the best) and
    protein_id (of the term's earliest raw row), ordered by RI descending, then accession, go_id.
    """
    _require(
        connection,
        view,
        (*TERM_KEYS, "category", "go_description", "reliability_index", "protein_id"),
        "preview",
    )
    return pl.from_arrow(
        connection.sql(
            f"""
            SELECT accession, go_id, category, go_description,
                   {_extreme("reliability_index", "max")} AS reliability_index,
                   arg_min({{'p': protein_id}}, {ROW_ORDER}).p AS protein_id
            FROM {_ident(view)}
            GROUP BY accession, go_id, category, go_description
            ORDER BY reliability_index DESC NULLS LAST, accession, go_id
            LIMIT $limit
            """,
            params={"limit": limit},
        ).to_arrow_table()
    )
