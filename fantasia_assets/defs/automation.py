"""Jobs, the sensor that reacts to reference, query and configuration changes, and the daily backstop.

`reference_change_sensor` reads the fingerprints of every (model, layer) reference set, the
query file's hash and the configuration's fingerprints each tick (cheap SQL, no vector read). A
changed fingerprint records a new observation of `reference_set` for that partition and
requests exactly that partition's re-computation; a changed query file or a changed setting of
the partitions' results (a new experiment_path included) requests every partition; a changed
setting of the run-wide outputs alone (`postprocess.summary`, `scoring`, or the scoring files
themselves, rewritten in place) requests only `lookup_outputs_job`; a setting of speed alone
(`config.SPEED_SETTINGS`: backend, device, screening, batch and cache sizes, alignment threads;
the redundancy settings while masking is off) requests nothing. The first tick only records. It also keeps the dynamic partitions equal to the current (model, layer) pairs, and
when one is dropped without any other change it requests the run-wide outputs, which then
leave the dropped partition out. When the configuration names a FASTA query file whose HDF5 is
missing or stale, the tick requests `query_embeddings_job` first (`embedding_request`).
`lookup_summary`, `topgo_ensemble` and `predictions` follow by their eager automation condition.

Run keys carry a change counter kept in the cursor, and the cursor's own random id: a state seen
before (annotations deleted, restored, then deleted again give the same fingerprint twice), or
after the cursor was cleared, is a new change, never a run that Dagster skips as already
requested.
"""

import json
import uuid

import dagster as dg

from ..errors import FantasiaError
from ..query_fasta import embedded_source, fasta_version, source_key
from .inputs import query_embeddings, query_sequences, reference_set
from .lookup import (
    go_annotation_cache,
    mmseqs_clusters,
    neighbour_hits,
    raw_result_shards,
    reference_embeddings,
    topgo_exports,
)
from .outputs import lookup_summary, topgo_ensemble
from .partitions import MODEL_LAYER, LookupState, outputs_fingerprint
from .resources import LookupSettings, ReferenceDatabase
from .science import predictions

DATA_VERSION_TAG = "dagster/data_version"

partition_job = dg.define_asset_job(
    "lookup_partition_job",
    selection=[reference_embeddings, neighbour_hits, raw_result_shards, topgo_exports],
    description="Re-compute one (model, layer): references, neighbours, raw rows, TopGO.",
)
shared_inputs_job = dg.define_asset_job(
    "lookup_shared_inputs_job",
    selection=[go_annotation_cache, mmseqs_clusters],
    description="Refresh the annotation table and the MMseqs2 clusters shared by every partition.",
)
query_embeddings_job = dg.define_asset_job(
    "query_embeddings_job",
    selection=[query_embeddings],
    description="Embed the configuration's FASTA query file (or record its HDF5) as query_embeddings.",
)
outputs_job = dg.define_asset_job(
    "lookup_outputs_job",
    selection=[lookup_summary, topgo_ensemble, predictions],
    description="Rebuild summary.csv, sequences.fasta, the query mapping, the TopGO ensemble and "
    "predictions.tsv.",
)


def evaluate_changes(state: LookupState, cursor: str | None, known_partitions: set[str]) -> dg.SensorResult:
    """The sensor's decision, given the current state and what the previous tick saw."""
    versions = state.versions()
    query_version = state.queries.content_hash  # hashed once, when the query catalogue was opened
    config_version = state.config.results_fingerprint(partition=True)
    outputs_version = outputs_fingerprint(state.config)
    previous = json.loads(cursor) if cursor else None
    outputs_changed = False
    partition_requests = []
    dropped = sorted(known_partitions - set(versions))
    if set(versions) - known_partitions:
        partition_requests.append(MODEL_LAYER.build_add_request(sorted(set(versions) - known_partitions)))
    if dropped:
        partition_requests.append(MODEL_LAYER.build_delete_request(dropped))
    changed: list[str] = []
    events: list[dg.AssetObservation] = []
    generation = previous.get("generation", 0) if previous else 0
    # the cursor's own id: a cursor cleared (UI, `dagster sensor cursor --delete`) restarts the
    # counter, and without it a later change could repeat a run key Dagster already ran, and skip it
    epoch = (previous or {}).get("epoch") or uuid.uuid4().hex[:12]
    if previous is None:  # record the versions the UI shows; compute nothing
        events = [
            dg.AssetObservation(asset_key=reference_set.key, partition=key, tags={DATA_VERSION_TAG: version})
            for key, version in sorted(versions.items())
        ]
        events.append(
            dg.AssetObservation(asset_key=query_embeddings.key, tags={DATA_VERSION_TAG: query_version})
        )
    else:
        queries_changed = previous.get("queries") != query_version
        config_changed = _config_changed(previous, state, config_version)
        outputs_changed = previous.get("outputs_config", outputs_version) != outputs_version
        changed = [
            key for key in sorted(versions)
            if queries_changed or config_changed or previous.get("partitions", {}).get(key) != versions[key]
        ]  # fmt: skip
        events = [
            dg.AssetObservation(
                asset_key=reference_set.key, partition=key, tags={DATA_VERSION_TAG: versions[key]}
            )
            for key in changed
            if previous.get("partitions", {}).get(key) != versions[key]
        ]
        if queries_changed:
            events.append(
                dg.AssetObservation(asset_key=query_embeddings.key, tags={DATA_VERSION_TAG: query_version})
            )
    outputs_only = previous is not None and not changed and (bool(dropped) or outputs_changed)
    if changed or outputs_only:
        generation += 1
    runs = [
        dg.RunRequest(
            job_name=partition_job.name,
            partition_key=key,
            run_key=f"{key}:{epoch}.{generation}:{versions[key]}:{query_version}:{config_version}",
            tags={"fantasia/trigger": "reference, query or configuration change"},
        )
        for key in changed
    ]
    if changed:
        runs.insert(
            0,
            dg.RunRequest(
                job_name=shared_inputs_job.name,
                run_key=f"shared:{epoch}.{generation}:{json.dumps(versions, sort_keys=True)}:{query_version}",
            ),
        )
    if outputs_only:  # nothing to re-compute, but the outputs show dropped partitions or old settings
        reasons = [f"partitions dropped: {', '.join(dropped)}"] if dropped else []
        reasons += ["settings of the run-wide outputs changed"] if outputs_changed else []
        runs.append(
            dg.RunRequest(
                job_name=outputs_job.name,
                run_key=f"outputs:{epoch}.{generation}:{','.join(dropped)}:{outputs_version}",
                tags={"fantasia/trigger": "; ".join(reasons)},
            )
        )
    return dg.SensorResult(
        run_requests=runs,
        cursor=json.dumps(
            {
                "partitions": versions,
                "queries": query_version,
                "search_config": config_version,
                "outputs_config": outputs_version,
                "generation": generation,
                "epoch": epoch,
            },
            sort_keys=True,
        ),
        dynamic_partitions_requests=partition_requests,
        asset_events=events,
        skip_reason=None
        if runs or partition_requests or events
        else "no reference, query or configuration change",
    )


def _config_changed(previous: dict, state: LookupState, version: str) -> bool:
    """Whether a setting of the partitions' results changed since the cursor was written. A
    cursor of an earlier version holds the fingerprint of every setting (or none: recorded now,
    not a change)."""
    if "search_config" in previous:
        return previous["search_config"] != version
    return "config" in previous and previous["config"] != state.config.fingerprint()


def embedding_request(settings: LookupSettings, database: ReferenceDatabase, cursor: str | None):
    """A run of `query_embeddings_job` while a FASTA query file's HDF5 is missing or stale, else None.

    The partitions are not requested with it: once the new HDF5 is written, the next tick sees
    its hash differ from the cursor's and requests every partition, as for any new query file.
    """
    config = settings.load()
    if config.query_fasta is None:
        return None
    engine = database.engine()
    version = fasta_version(config)
    key = source_key(config, engine, version)
    if embedded_source(config.embeddings_path) == key:
        return None
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                job_name=query_embeddings_job.name,
                run_key=f"embed:{key}",
                tags={"fantasia/trigger": "query FASTA or embedders changed"},
            )
        ],
        cursor=cursor,
        asset_events=[dg.AssetObservation(asset_key=query_sequences.key, tags={DATA_VERSION_TAG: version})],
    )


@dg.sensor(
    jobs=[partition_job, shared_inputs_job, query_embeddings_job, outputs_job],
    minimum_interval_seconds=15,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Re-materialise the (model, layer) partitions whose references, queries or configuration changed.",
)
def reference_change_sensor(
    context: dg.SensorEvaluationContext, settings: LookupSettings, database: ReferenceDatabase
) -> dg.SensorResult:
    known = set(context.instance.get_dynamic_partitions(MODEL_LAYER.name))
    return guarded_tick(settings, database, context.cursor, known)


def guarded_tick(
    settings: LookupSettings, database: ReferenceDatabase, cursor: str | None, known: set[str]
) -> dg.SensorResult | dg.SkipReason:
    """`evaluate_changes`, or a skip naming the problem when the inputs cannot be read now.

    A query file being copied in (truncated until the copy ends), a bad configuration or a
    database restart must not turn into a sensor error at every tick: the tick is skipped with
    the reason, the cursor stays, and the change is seen once the inputs are readable again.
    """
    try:
        return embedding_request(settings, database, cursor) or evaluate_changes(
            LookupState.open(settings, database), cursor, known
        )
    except FantasiaError as error:  # database-driver errors arrive translated by db/
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        return dg.SkipReason(f"inputs not readable now, looking again next tick: {message}")


def stale_partitions(instance: dg.DagsterInstance, state: LookupState) -> list[str]:
    """Partitions whose last raw rows were made from other references, queries or configuration
    than now's (an experiment_path of its own included: a new one holds none of them)."""
    stale = []
    for key, partition in sorted(state.partitions.items()):
        records = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=raw_result_shards.key, asset_partitions=[key]), limit=1
        ).records
        if not records:
            stale.append(key)
            continue
        metadata = records[0].asset_materialization.metadata
        made_from = (
            getattr(metadata.get("reference_version"), "value", None),
            getattr(metadata.get("query_version"), "value", None),
            getattr(metadata.get("search_config_version"), "value", None),
        )
        settings = state.config.results_fingerprint(partition=True)
        if made_from[2] is None:  # made by an earlier version: the fingerprint of every setting
            made_from = (*made_from[:2], getattr(metadata.get("config_version"), "value", None))
            settings = state.config.fingerprint()
        now = (state.reference_version(partition), state.queries.content_hash, settings)
        if made_from != now:
            stale.append(key)
    return stale


@dg.schedule(
    cron_schedule="0 4 * * *",
    job=partition_job,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily backstop: re-compute every partition whose results are stale or missing.",
)
def daily_backstop(
    context: dg.ScheduleEvaluationContext, settings: LookupSettings, database: ReferenceDatabase
):
    try:
        stale = stale_partitions(context.instance, LookupState.open(settings, database))
    except (FantasiaError, dg.Failure) as error:  # a configuration being edited, a database restart
        return _unreadable(error)
    return [
        dg.RunRequest(partition_key=key, run_key=f"backstop:{context.scheduled_execution_time}:{key}")
        for key in stale
    ]


def _unreadable(error: Exception) -> dg.SkipReason:
    """A schedule's tick skipped on a configuration being edited or a database restart."""
    text = getattr(error, "description", None) or str(error) or type(error).__name__
    return dg.SkipReason(f"inputs not readable now, looking again at the next tick: {text.splitlines()[0]}")


def stale_outputs(instance: dg.DagsterInstance, version: str) -> list[str]:
    """The run-wide output assets whose last materialisation recorded other outputs' settings
    than `version` (a `lookup_outputs_job` run that failed after an outputs-only change)."""
    stale = []
    for asset in (lookup_summary, predictions):
        records = instance.fetch_materializations(dg.AssetRecordsFilter(asset_key=asset.key), limit=1).records
        if records:  # never made: their eager automation condition makes them
            made = records[0].asset_materialization.metadata.get("outputs_config_version")
            if getattr(made, "value", None) != version:
                stale.append(asset.key.to_user_string())
    return stale


@dg.schedule(
    cron_schedule="30 4 * * *",
    job=outputs_job,
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily backstop of the run-wide outputs: rebuild summary.csv, the ensemble and "
    "predictions.tsv when they were last made with other settings of theirs (a run that failed).",
)
def daily_outputs_backstop(
    context: dg.ScheduleEvaluationContext, settings: LookupSettings, database: ReferenceDatabase
):
    try:
        version = outputs_fingerprint(LookupState.open(settings, database).config)
    except (FantasiaError, dg.Failure) as error:
        return _unreadable(error)
    stale = stale_outputs(context.instance, version)
    if not stale:
        return dg.SkipReason("the run-wide outputs were made with the current settings")
    return dg.RunRequest(
        run_key=f"outputs-backstop:{context.scheduled_execution_time}",
        tags={"fantasia/trigger": f"made with other settings: {', '.join(stale)}"},
    )


output_automation = dg.AutomationConditionSensorDefinition(
    "output_automation",
    target=[lookup_summary, topgo_ensemble, predictions],
    default_status=dg.DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=15,
    description="Rebuild the run-wide outputs once their partitions have been updated.",
)
