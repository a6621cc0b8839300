"""Run-wide outputs over every materialised (model, layer): summary.csv and the TopGO ensemble."""

from pathlib import Path

import dagster as dg

from .. import runner
from ..core import aggregate
from ..core.locks import experiment_lock
from ..core.plan import Partition
from ..core.stale import remove_stale_partitions
from ..core.summary import SUMMARY_CODE_VERSION, TOPGO_CODE_VERSION
from ..core.timing import timed
from ..core.writers import OUTPUT_FORMAT_VERSION
from .lookup import raw_result_shards
from .metadata import best_predictions, files_version
from .partitions import LookupState, outputs_fingerprint, partition_key, record_lineage
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
    "sequences.fasta and query_index_mapping.csv; the output folders of a (model, layer) the "
    "configuration dropped are removed.",
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
    # folders of (model, layer)s the configuration dropped would look current beside a summary
    # that no longer covers them: removed and named, as the CLI's run does
    removed = _remove_stale(state)
    for folder in removed:
        context.log.warning(f"removed {folder}: its (model, layer) is not in the configuration any more")
    missing = [partition_key(p) for p in state.partitions.values() if p not in partitions]
    if missing:  # enabled, never computed: the summary cannot cover them yet
        context.log.warning(f"not in the summary, not computed yet: {', '.join(missing)}")
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
            "not_computed": dg.MetadataValue.json(missing),
            "removed_stale": dg.MetadataValue.json(
                [str(f.relative_to(state.config.experiment_path)) for f in removed]
            ),
            "outputs_config_version": outputs_fingerprint(state.config),  # `daily_outputs_backstop`
        },
    )


def _remove_stale(state: LookupState) -> list[Path]:
    """The partition folders of models and layers the configuration no longer has, removed
    (`core.stale`), under the experiment's lock: what the end of `runner.run_lookup` does."""
    current = [p.relative_dir() for p in state.partitions.values()]  # computed or not
    with experiment_lock(state.config.experiment_path, probe=False):
        return remove_stale_partitions(state.config.experiment_path, current, topgo=state.config.topgo)


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
