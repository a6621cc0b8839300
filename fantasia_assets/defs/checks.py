"""Asset checks: each reads what its asset wrote (files on disk), never the asset's in-memory values.

A check that recomputed its asset's result from the same frame could not fail; these open the
written files, so a truncated, edited or stale file fails them. A file that cannot be read
fails its check with the reason.
"""

import io
import warnings
import zipfile
from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from .. import runner
from ..core import exports
from ..core.queries import ACCESSION_PREFIX
from ..core.summary import column_suffix
from .lookup import neighbour_hits, raw_result_shards, reference_embeddings, topgo_exports
from .outputs import lookup_summary
from .partitions import MODEL_LAYER, LookupState, partition_key
from .resources import LookupSettings, ReferenceDatabase

# a check per (model, layer) partition is "preview" in Dagster 1.13; the warning would repeat in every process
warnings.filterwarnings(
    "ignore", message=".*partitions_def on an AssetCheckSpec.*", category=dg.PreviewWarning
)

_UNREADABLE = (OSError, ValueError, KeyError, zipfile.BadZipFile, pl.exceptions.PolarsError)


def _latest_metadata(context: dg.AssetCheckExecutionContext, asset: dg.AssetsDefinition) -> dict:
    partitions = [context.partition_key] if context.has_partition_key else None
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset.key, asset_partitions=partitions), limit=1
    ).records
    return {k: v.value for k, v in records[0].asset_materialization.metadata.items()} if records else {}


def _unreadable(path: Path, error: Exception) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(
        passed=False,
        severity=dg.AssetCheckSeverity.ERROR,
        metadata={"file": dg.MetadataValue.path(str(path)), "unreadable": f"{type(error).__name__}: {error}"},
    )


def matrix_columns(path: Path) -> int:
    """Columns of a cached reference matrix (a float16 .npy), read from its header alone."""
    shape = np.load(path, mmap_mode="r").shape
    if len(shape) != 2:
        raise ValueError(f"vectors of shape {shape}, expected (references, dimensions)")
    return int(shape[1])


@dg.asset_check(
    asset=reference_embeddings,
    partitions_def=MODEL_LAYER,
    description="The cached reference matrix (the file the asset wrote or reused) has as many "
    "dimensions as the query vectors of the same (model, layer).",
)
def dimensions_agree(
    context: dg.AssetCheckExecutionContext, settings: LookupSettings, database: ReferenceDatabase
) -> dg.AssetCheckResult:
    state = LookupState.open(settings, database)
    partition = state.partition(context.partition_key)
    recorded = _latest_metadata(context, reference_embeddings).get("matrix_file")
    if recorded is None:
        return dg.AssetCheckResult(
            passed=False, metadata={"matrix_file": "none recorded: reference_embeddings not materialised"}
        )
    path = Path(recorded)
    try:
        reference_dim = matrix_columns(path)
    except _UNREADABLE as error:
        return _unreadable(path, error)
    query_dim = state.queries.catalogue.layers[(partition.type_id, partition.layer)].dim
    return dg.AssetCheckResult(
        passed=query_dim == reference_dim,
        metadata={
            "query_dimensions": query_dim,
            "reference_dimensions": reference_dim,
            "matrix_file": dg.MetadataValue.path(str(path)),
        },
    )


@dg.asset_check(
    asset=neighbour_hits,
    partitions_def=MODEL_LAYER,
    description="Every query of the file is in the written hits, or listed as having no neighbour "
    "within the threshold, or listed as left out (a warning); anything else is an error.",
)
def every_query_answered(
    context: dg.AssetCheckExecutionContext, settings: LookupSettings, database: ReferenceDatabase
) -> dg.AssetCheckResult:
    state = LookupState.open(settings, database)
    paths = runner.partition_paths(state.config, state.partition(context.partition_key))
    frames = {}
    for name in ("hits", "no_hits", "skipped"):
        try:
            frames[name] = pl.read_parquet(paths[name])
        except _UNREADABLE as error:
            return _unreadable(paths[name], error)
    with_hits = set(frames["hits"]["accession"].to_list())
    without = sorted(set(frames["no_hits"]["accession"].to_list()))
    skipped = list(frames["skipped"].iter_rows())
    left_out = {group[len(ACCESSION_PREFIX) :] for group, _ in skipped}
    expected = set(state.queries.catalogue.accessions)
    unaccounted = expected - with_hits - set(without) - left_out
    unknown = (with_hits | set(without)) - expected  # written for a query the file does not have
    wrong = unaccounted or unknown
    return dg.AssetCheckResult(
        # a query left out for bad data is accounted for, but is worth a warning
        passed=not wrong and not left_out,
        severity=dg.AssetCheckSeverity.ERROR if wrong else dg.AssetCheckSeverity.WARN,
        metadata={
            "queries": len(expected),
            "with_neighbours": len(with_hits & expected),
            "none_within_threshold": dg.MetadataValue.json(without[:100]),
            "left_out": len(left_out),
            "left_out_reasons": dg.MetadataValue.json(
                [f"{group}: {reason}" for group, reason in skipped[:100]]
            ),
            "unaccounted": len(unaccounted),
            "unaccounted_examples": dg.MetadataValue.json(sorted(unaccounted)[:20]),
            "not_in_query_file": len(unknown),
        },
    )


def _read_topgo(source: Path | io.BytesIO) -> pl.DataFrame:
    """A .topgo file (TSV without header); empty input gives an empty table."""
    if isinstance(source, io.BytesIO) and not source.getbuffer().nbytes:
        return pl.DataFrame(
            schema={"accession": pl.String, "go_id": pl.String, "reliability_index": pl.Float64}
        )
    return pl.read_csv(
        source,
        separator="\t",
        has_header=False,
        new_columns=["accession", "go_id", "reliability_index"],
        schema_overrides={"accession": pl.String, "go_id": pl.String, "reliability_index": pl.Float64},
    )


@dg.asset_check(
    asset=topgo_exports,
    partitions_def=MODEL_LAYER,
    description="The written .topgo files hold exactly the (accession, GO term) pairs of the raw "
    "rows, each with its best reliability index at the configured precision.",
)
def topgo_rows_in_raw_rows(
    context: dg.AssetCheckExecutionContext, settings: LookupSettings, database: ReferenceDatabase
) -> dg.AssetCheckResult:
    state = LookupState.open(settings, database)
    config = state.config
    if not config.topgo:
        return dg.AssetCheckResult(passed=True, metadata={"topgo": "off (lookup.topgo is false)"})
    paths = runner.partition_paths(config, state.partition(context.partition_key))
    try:
        raw = pl.read_parquet(paths["raw"])
    except _UNREADABLE as error:
        return _unreadable(paths["raw"], error)
    keys = ["accession", "go_id"]
    lines = [*keys, "reliability_index"]
    # what each file should hold, read back in the written form (RI at the configured precision)
    expected = {
        exports.safe_name(str(category)) + ".topgo": _read_topgo(
            io.BytesIO(exports.csv_bytes(table, config.precision, header=False, separator="\t"))
        )
        for category, table in runner.partition_topgo_tables(config, raw).items()
    }
    written = sorted(p.name for p in paths["topgo"].glob("*.topgo")) if paths["topgo"].is_dir() else []
    counts = {"lines": 0, "not_in_raw": 0, "missing": 0, "wrong_ri": 0}
    for name in sorted(set(expected) | set(written)):
        want = expected.get(name, _read_topgo(io.BytesIO(b"")))
        if name in written:
            try:
                have = _read_topgo(paths["topgo"] / name)
            except _UNREADABLE as error:
                return _unreadable(paths["topgo"] / name, error)
        else:
            have = want.clear()
        unmatched = have.join(want, on=lines, how="anti")  # a line that is no raw row
        wrong_ri = unmatched.join(want, on=keys, how="semi").height  # the pair is, with another RI
        counts["lines"] += have.height
        counts["wrong_ri"] += wrong_ri
        counts["not_in_raw"] += unmatched.height - wrong_ri
        counts["missing"] += want.join(have, on=lines, how="anti").height
    return dg.AssetCheckResult(
        passed=counts["not_in_raw"] == counts["missing"] == counts["wrong_ri"] == 0,
        metadata={**counts, "folder": dg.MetadataValue.path(str(paths["topgo"]))},
    )


@dg.asset_check(
    asset=lookup_summary,
    description="The written summary.csv has the score columns of every (model, layer) whose raw "
    "rows are materialised.",
)
def covers_every_partition(
    context: dg.AssetCheckExecutionContext, settings: LookupSettings, database: ReferenceDatabase
) -> dg.AssetCheckResult:
    state = LookupState.open(settings, database)
    path = state.config.experiment_path / "summary.csv"
    try:
        header = set(pl.read_csv(path, n_rows=0).columns)
    except _UNREADABLE as error:
        return _unreadable(path, error)
    done = {
        key
        for key in context.instance.get_materialized_partitions(raw_result_shards.key)
        if key in state.partitions
    }
    suffixes = {partition_key(p): column_suffix(p.model.name, p.layer) for p in state.partitions.values()}
    current = set(suffixes.values())
    covered = {key for key, suffix in suffixes.items() if f"final_score_{suffix}" in header}
    # columns of partitions the configuration dropped: a summary written before the change
    stale = sorted(
        column.removeprefix("final_score_")
        for column in header
        if column.startswith("final_score_") and column.removeprefix("final_score_") not in current
    )
    return dg.AssetCheckResult(
        passed=done <= covered and not stale,
        metadata={
            "materialised": dg.MetadataValue.json(sorted(done)),
            "missing": dg.MetadataValue.json(sorted(done - covered)),
            "not_in_the_configuration": dg.MetadataValue.json(stale),
            "summary": dg.MetadataValue.path(str(path)),
        },
    )


ALL = [dimensions_agree, every_query_answered, topgo_rows_in_raw_rows, covers_every_partition]
