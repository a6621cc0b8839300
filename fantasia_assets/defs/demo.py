"""Materialise the whole asset graph in-process through the defined jobs (the demo, and tests)."""

from __future__ import annotations

import dagster as dg

from .partitions import MODEL_LAYER


def materialize_everything(instance: dg.DagsterInstance, log=print) -> list[str]:
    """Register the current partitions, then run the jobs of `definitions` in order: shared inputs,
    the partition job for every partition, the run-wide outputs. Returns the partition keys."""
    from ..definitions import defs
    from .automation import outputs_job, partition_job, shared_inputs_job

    keys = register_partitions(instance, log)[0]

    def run(job: dg.UnresolvedAssetJobDefinition, partition_key: str | None = None) -> None:
        result = defs.resolve_job_def(job.name).execute_in_process(
            instance=instance,
            partition_key=partition_key,
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        )
        if not result.success:
            raise RuntimeError(f"{job.name} {partition_key or ''} failed")

    log(f"running {shared_inputs_job.name}")
    run(shared_inputs_job)
    for key in keys:
        log(f"running {partition_job.name} for partition {key}")
        run(partition_job, key)
    log(f"running {outputs_job.name}")
    run(outputs_job)
    return keys


def register_partitions(instance: dg.DagsterInstance, log=print) -> tuple[list[str], list[str], list[str]]:
    """Make the instance's (model, layer) partitions those of the configuration, reference
    database and query file now (a FASTA query file embedded first, `embed_queries`): what the
    sensor does on its ticks. Returns (current keys, added, removed)."""
    from ..definitions import defs
    from .partitions import LookupState

    resources = defs.resources
    embed_queries(instance, log)  # a FASTA query file is embedded before the partitions are planned
    # resolve EnvVar fields the way a run does, outside of one
    state = LookupState.open(
        resources["settings"].process_config_and_initialize(),
        resources["database"].process_config_and_initialize(),
    )
    keys = list(state.partitions)
    known = set(instance.get_dynamic_partitions(MODEL_LAYER.name))
    added = [k for k in keys if k not in known]
    removed = sorted(known - set(keys))
    instance.add_dynamic_partitions(MODEL_LAYER.name, added)
    for key in removed:
        instance.delete_dynamic_partition(MODEL_LAYER.name, key)
    return keys, added, removed


def embed_queries(instance: dg.DagsterInstance, log=print) -> None:
    """Run `query_embeddings_job`: embeds the configuration's FASTA query file, or records its HDF5."""
    from ..definitions import defs
    from .automation import query_embeddings_job

    log(f"running {query_embeddings_job.name}")
    result = defs.resolve_job_def(query_embeddings_job.name).execute_in_process(
        instance=instance, run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    )
    if not result.success:
        raise RuntimeError(f"{query_embeddings_job.name} failed")
