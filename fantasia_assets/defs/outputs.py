"""Run-wide outputs over every materialised (model, layer): summary.csv and the TopGO ensemble."""

import dagster as dg

from .. import runner
from ..core import aggregate
from ..core.plan import Partition
from ..core.summary import SUMMARY_CODE_VERSION, TOPGO_CODE_VERSION
from ..core.timing import timed
from ..core.writers import OUTPUT_FORMAT_VERSION
from .lookup import raw_result_shards
from .metadata import best_predictions, files_version
from .partitions import LookupState, partition_key, record_lineage
from .resources import LineageStore, LookupSettings, ReferenceDatabase


def materialised(state: LookupState) -> list[Partition]:
    """Current partitions whose raw rows exist on disk."""
    return [p for p in state.partitions.values() if runner.partition_paths(state.config, p)["raw"].exists()]


@dg.asset(
    code_version=f"{SUMMARY_CODE_VERSION}+{OUTPUT_FORMAT_VERSION}",
    group_name="outputs",
    deps=[raw_result_shards],
    kinds={"csv"},
    automation_condition=dg.AutomationCondition.eager(),
    description="summary.csv (SPEC §4.2) over every materialised (model, layer), plus "
    "sequences.fasta and query_index_mapping.csv.",
)
def lookup_summary(
    context: dg.AssetExecutionContext,
    settings: LookupSettings,
    database: ReferenceDatabase,
    lineage: LineageStore,
) -> dg.MaterializeResult:
    state = LookupState.open(settings, database)
    partitions = materialised(state)
    timings: dict[str, float] = {}
    with timed(timings, "summary"):
        summary = runner.write_summary(state.config, partitions)
        with runner.open_raw_rows(state.config, partitions) as rows:
            references, top = aggregate.reference_ids(rows), aggregate.top_predictions(rows, 15)
        fasta, mapping = runner.write_sequences(state.config, state.queries, references, state.engine)
        records = runner.write_run_records(state.config, state.queries, list(state.partitions.values()))
    record_lineage(context, lineage, state, {"rows": summary.rows, "partitions": len(partitions)}, timings)
    return dg.MaterializeResult(
        metadata={
            "rows": summary.rows,
            "partitions": dg.MetadataValue.json([partition_key(p) for p in partitions]),
            "consumed_raw_rows": _consumed(state, partitions),
            "summary": dg.MetadataValue.path(str(summary.path)),
            "sequences": dg.MetadataValue.path(str(fasta)),
            "query_mapping": dg.MetadataValue.path(str(mapping)),
            "skipped_queries": dg.MetadataValue.path(str(records["skipped queries"])),
            "output_names": dg.MetadataValue.path(str(records["output names"])),
            "best_predictions": dg.MetadataValue.md(best_predictions(top)),
        },
    )


def _consumed(state: LookupState, partitions: list[Partition]) -> dg.MetadataValue:
    """Partition key → fingerprint of the raw rows Parquet read (raw_result_shards' data version)."""
    return dg.MetadataValue.json(
        {
            partition_key(p): files_version([runner.partition_paths(state.config, p)["raw"]])
            for p in partitions
        }
    )


@dg.asset(
    code_version=f"{TOPGO_CODE_VERSION}+{OUTPUT_FORMAT_VERSION}",
    group_name="outputs",
    deps=[raw_result_shards],
    kinds={"topgo"},
    automation_condition=dg.AutomationCondition.eager(),
    description="topgo/ensemble/{category}.topgo: best RI per (accession, GO term) across all models and "
    "layers; nothing is written when lookup.topgo is false.",
)
def topgo_ensemble(
    context: dg.AssetExecutionContext,
    settings: LookupSettings,
    database: ReferenceDatabase,
    lineage: LineageStore,
) -> dg.MaterializeResult:
    state = LookupState.open(settings, database)
    if not state.config.topgo:
        return dg.MaterializeResult(metadata={"topgo": "off (lookup.topgo is false)"})
    partitions = materialised(state)
    timings: dict[str, float] = {}
    with timed(timings, "write"):
        files = runner.write_ensemble(state.config, partitions)
    record_lineage(context, lineage, state, {"files": len(files)}, timings)
    return dg.MaterializeResult(
        metadata={
            "files": dg.MetadataValue.json([str(f) for f in files]),
            "partitions": len(partitions),
            "consumed_raw_rows": _consumed(state, partitions),
        }
    )
