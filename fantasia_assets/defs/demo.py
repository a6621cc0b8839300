"""Materialise the whole asset graph in-process (the demo, and tests), recorded in an instance."""

from __future__ import annotations

import dagster as dg

from .partitions import MODEL_LAYER


def materialize_everything(instance: dg.DagsterInstance, log=print) -> list[str]:
    """Register the current partitions, then materialise shared inputs, every partition and the
    run-wide outputs, in that order. Returns the partition keys."""
    from ..definitions import defs
    from . import inputs, lookup, outputs
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
    instance.add_dynamic_partitions(MODEL_LAYER.name, [k for k in keys if k not in known])
    stale = sorted(known - set(keys))
    for key in stale:
        instance.delete_dynamic_partition(MODEL_LAYER.name, key)
    sources = [inputs.reference_set, inputs.query_sequences, inputs.query_embeddings, inputs.go_ontology]
    shared = [lookup.go_annotation_cache, lookup.mmseqs_clusters]
    partitioned = [
        lookup.reference_embeddings,
        lookup.neighbour_hits,
        lookup.raw_result_shards,
        lookup.topgo_exports,
    ]
    run_wide = [outputs.lookup_summary, outputs.topgo_ensemble]
    everything = sources + shared + partitioned + run_wide

    def run(selection, partition_key=None):
        result = dg.materialize(
            everything,
            selection=selection,
            resources=resources,
            instance=instance,
            partition_key=partition_key,
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        )
        if not result.success:
            raise RuntimeError(f"materialisation of {selection} failed")

    log(f"materialising shared inputs: {', '.join(a.key.to_user_string() for a in shared)}")
    run(shared)
    for key in keys:
        log(f"materialising partition {key}")
        run(partitioned, key)
    log("materialising summary and TopGO ensemble")
    run(run_wide)
    return keys


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
