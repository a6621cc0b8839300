"""The one Definitions object: assets, checks, resources, jobs, automation."""

from __future__ import annotations

import dagster as dg

from .defs import automation, checks, cluster, inputs, lookup, outputs, science
from .defs.resources import default_resources

defs = dg.Definitions(
    assets=[
        inputs.reference_set,
        inputs.query_sequences,
        inputs.query_embeddings,
        inputs.go_ontology,
        lookup.go_annotation_cache,
        lookup.mmseqs_clusters,
        lookup.reference_embeddings,
        lookup.neighbour_hits,
        lookup.raw_result_shards,
        lookup.topgo_exports,
        outputs.lookup_summary,
        outputs.topgo_ensemble,
        science.predictions,
        science.scoring_model,
        science.evaluation,
    ],
    asset_checks=checks.ALL,
    jobs=[
        automation.partition_job,
        automation.shared_inputs_job,
        automation.outputs_job,
        automation.query_embeddings_job,
        cluster.partition_dask_job,
    ],
    sensors=[automation.reference_change_sensor, automation.output_automation],
    schedules=[automation.daily_backstop, automation.daily_outputs_backstop],
    resources={
        **default_resources(),
        "truth": science.TruthAnnotations(gaf_paths=dg.EnvVar("FANTASIA_TRUTH")),
    },
    # steps of a run share one process: imports (torch, polars) are paid once per run, and the
    # GPU pool, not process parallelism, decides what runs together
    executor=dg.in_process_executor,
)
