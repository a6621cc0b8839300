"""The lookup assets: shared caches, then per (model, layer) references → neighbours → rows → TopGO.

Each asset opens the lookup state, calls one stage through `fantasia_assets.runner` and reports
what it did; the science stays in `core/`.
"""

import time

import dagster as dg
import polars as pl

from .. import runner
from ..core.queries import ACCESSION_PREFIX
from ..core.summary import topgo_tables
from ..db.stores import AnnotationStore, ReferenceStore
from ..paths import cache_dir
from ..progress import log_progress
from .inputs import go_ontology, query_embeddings, reference_set
from .metadata import best_predictions, distance_histogram, timings_table
from .partitions import MODEL_LAYER, LookupState, record_lineage
from .resources import ComputeDevice, LineageStore, LookupSettings, MMseqs, ReferenceDatabase

GPU_POOL = "gpu"
# Read by dagster-k8s's k8s_job_executor (one pod per step): the search step's pod asks the
# cluster for one GPU; by dagster-dask's executor: the step runs on a worker started with
# `--resources GPU=1`. Other executors ignore the tags.
GPU_OP_TAGS = {
    "dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}},
    "dagster-dask/resource_requirements": {"GPU": 1},
}


@dg.asset(
    group_name="lookup",
    deps=[go_ontology, reference_set],
    kinds={"postgres", "parquet"},
    description="Every GO annotation of every reference protein as one columnar table (Parquet "
    "cache under $FANTASIA_HOME), fetched once per annotation version.",
)
def go_annotation_cache(
    context: dg.AssetExecutionContext,
    settings: LookupSettings,
    database: ReferenceDatabase,
    lineage: LineageStore,
) -> dg.MaterializeResult:
    state = LookupState.open(settings, database)
    started = time.perf_counter()
    first = next(iter(state.partitions.values()), None)
    scope = runner.reference_scope(state.config, first) if first else None
    annotations, version = AnnotationStore(state.engine, cache_dir("annotations")).get(scope)
    timings = {"fetch": time.perf_counter() - started}
    by_category = dict(annotations.group_by("category").len().sort("category").iter_rows())
    record_lineage(context, lineage, state, {"annotations": annotations.height}, timings)
    return dg.MaterializeResult(
        metadata={
            "annotations": annotations.height,
            "proteins": annotations["protein_id"].n_unique(),
            "by_category": dg.MetadataValue.json({str(k): v for k, v in by_category.items()}),
            "annotation_version": version,
            "database": database.label(),
        },
        data_version=dg.DataVersion(version),
    )


@dg.asset(
    group_name="lookup",
    deps=[reference_set, query_embeddings],
    kinds={"mmseqs2"},
    description="MMseqs2 clusters of all reference and query sequences (SPEC §3.5), computed once per "
    "(reference set, query set, identity, coverage) and cached; off when redundancy.identity is 0.",
)
def mmseqs_clusters(
    context: dg.AssetExecutionContext,
    settings: LookupSettings,
    database: ReferenceDatabase,
    mmseqs: MMseqs,
    lineage: LineageStore,
) -> dg.MaterializeResult:
    state = LookupState.open(settings, database)
    if state.config.redundancy.identity <= 0:
        return dg.MaterializeResult(metadata={"masking": "off (lookup.redundancy.identity is 0)"})
    started = time.perf_counter()
    clusters = runner.redundancy_clusters(
        state.config, state.queries, state.engine, list(state.partitions.values()), cache_dir("mmseqs"),
        log_progress(context.log),
    )  # fmt: skip
    timings = {"cluster": time.perf_counter() - started}
    counts = {"sequences": len(clusters), "clusters": len(set(clusters.values()))}
    record_lineage(context, lineage, state, counts, timings)
    return dg.MaterializeResult(metadata={**counts, "binary": mmseqs.binary(), "seconds": timings["cluster"]})


@dg.asset(
    partitions_def=MODEL_LAYER,
    group_name="lookup",
    deps=[reference_set],
    kinds={"postgres", "numpy"},
    check_specs=[dg.AssetCheckSpec("dimensions_agree", asset="reference_embeddings")],
    description="The (model, layer) reference matrix streamed from PostgreSQL, cached on disk by "
    "fingerprint so unchanged references are never fetched twice.",
)
def reference_embeddings(
    context: dg.AssetExecutionContext,
    settings: LookupSettings,
    database: ReferenceDatabase,
    lineage: LineageStore,
) -> dg.MaterializeResult:
    state = LookupState.open(settings, database)
    partition = state.partition(context.partition_key)
    store = ReferenceStore(state.engine, cache_dir("references"), state.config.lookup_cache_max)
    started = time.perf_counter()
    matrix = store.get(runner.reference_scope(state.config, partition), log_progress(context.log))
    timings = {"fetch": time.perf_counter() - started}
    query_dim = state.queries.catalogue.layers[(partition.type_id, partition.layer)].dim
    version = record_lineage(context, lineage, state, {"references": len(matrix)}, timings, partition)
    return dg.MaterializeResult(
        metadata={
            "references": len(matrix),
            "dimensions": matrix.dim,
            "source": store.last_source,
            "reference_version": version,
            "seconds": timings["fetch"],
        },
        data_version=dg.DataVersion(version),
        check_results=[
            dg.AssetCheckResult(
                check_name="dimensions_agree",
                passed=query_dim == matrix.dim,
                metadata={"query_dimensions": query_dim, "reference_dimensions": matrix.dim},
            )
        ],
    )


@dg.asset(
    partitions_def=MODEL_LAYER,
    group_name="lookup",
    deps=[reference_embeddings, query_embeddings, mmseqs_clusters],
    kinds={"torch", "parquet"},
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    check_specs=[dg.AssetCheckSpec("every_query_answered", asset="neighbour_hits")],
    description="Exact k nearest references of every query (blocked matmul + top-k on the GPU "
    "when there is one), written once as Parquet.",
)
def neighbour_hits(
    context: dg.AssetExecutionContext,
    settings: LookupSettings,
    database: ReferenceDatabase,
    device: ComputeDevice,
    lineage: LineageStore,
) -> dg.MaterializeResult:
    state = LookupState.open(settings, database)
    config, partition = state.config, state.partition(context.partition_key)
    clusters = runner.redundancy_clusters(
        config, state.queries, state.engine, list(state.partitions.values()), cache_dir("mmseqs")
    )
    store = ReferenceStore(state.engine, cache_dir("references"), config.lookup_cache_max)
    where = device.device(config)
    outcome = runner.search_partition(
        config, state.queries, partition, store, clusters, where, log_progress(context.log)
    )
    runner.write_hits(config, partition, outcome)
    counts = {"queries": outcome.n_queries, "neighbours": outcome.hits.height}
    version = record_lineage(context, lineage, state, counts, outcome.timings, partition)
    answered = set(outcome.hits["accession"].unique().to_list()) | set(outcome.queries_without_hits)
    catalogue = state.queries.catalogue
    left_out = {group[len(ACCESSION_PREFIX) :] for group, _ in outcome.skipped}
    expected = set(catalogue.accessions)
    unaccounted = expected - answered - left_out
    return dg.MaterializeResult(
        metadata={
            **counts,
            "queries_without_neighbours": len(outcome.queries_without_hits),
            "device": where,
            "reference_version": version,
            "query_version": state.queries.content_hash,
            "distance_histogram": dg.MetadataValue.md(
                distance_histogram(outcome.hits["distance"].to_numpy())
            ),
            "timings": dg.MetadataValue.md(timings_table(outcome.timings)),
        },
        check_results=[
            dg.AssetCheckResult(
                check_name="every_query_answered",
                # a query left out for bad data is accounted for, but is worth a warning
                passed=not unaccounted and not left_out,
                severity=dg.AssetCheckSeverity.ERROR if unaccounted else dg.AssetCheckSeverity.WARN,
                metadata={
                    "queries": len(expected),
                    "with_neighbours": len(answered) - len(outcome.queries_without_hits),
                    "none_within_threshold": dg.MetadataValue.json(outcome.queries_without_hits[:100]),
                    "left_out": len(left_out),
                    "left_out_reasons": dg.MetadataValue.json(
                        [f"{group}: {reason}" for group, reason in outcome.skipped[:100]]
                    ),
                    "unaccounted": len(unaccounted),
                },
            )
        ],
    )


@dg.asset(
    partitions_def=MODEL_LAYER,
    group_name="lookup",
    deps=[neighbour_hits, go_annotation_cache],
    kinds={"parquet", "csv"},
    description="One row per (neighbour × GO term) with reliability index and alignment metrics: "
    "raw_results/{model}/layer_{k}/{accession}.csv, replaced whole on re-runs.",
)
def raw_result_shards(
    context: dg.AssetExecutionContext,
    settings: LookupSettings,
    database: ReferenceDatabase,
    lineage: LineageStore,
) -> dg.MaterializeResult:
    state = LookupState.open(settings, database)
    config, partition = state.config, state.partition(context.partition_key)
    hits = runner.read_hits(config, partition)
    annotations, _ = AnnotationStore(state.engine, cache_dir("annotations")).get(
        runner.reference_scope(config, partition)
    )
    timings: dict[str, float] = {}
    raw = runner.build_raw_rows(
        config, state.queries, partition, hits, annotations, state.engine, timings=timings
    )
    started = time.perf_counter()
    paths = runner.write_raw(config, partition, raw, state.queries)
    timings["write"] = time.perf_counter() - started
    counts = {"rows": raw.height, "accessions": raw["accession"].n_unique()}
    version = record_lineage(context, lineage, state, counts, timings, partition)
    return dg.MaterializeResult(
        metadata={
            **counts,
            "shards": dg.MetadataValue.path(str(paths["shards"])),
            "reference_version": version,
            "query_version": state.queries.content_hash,
            "best_predictions": dg.MetadataValue.md(best_predictions(raw)),
            "timings": dg.MetadataValue.md(timings_table(timings)),
        }
    )


@dg.asset(
    partitions_def=MODEL_LAYER,
    group_name="outputs",
    deps=[raw_result_shards],
    kinds={"topgo"},
    check_specs=[dg.AssetCheckSpec("topgo_rows_in_raw_rows", asset="topgo_exports")],
    description="topgo/{model}/layer_{k}/{category}.topgo: best RI per (accession, GO term).",
)
def topgo_exports(
    context: dg.AssetExecutionContext,
    settings: LookupSettings,
    database: ReferenceDatabase,
    lineage: LineageStore,
) -> dg.MaterializeResult:
    state = LookupState.open(settings, database)
    config, partition = state.config, state.partition(context.partition_key)
    raw = pl.read_parquet(runner.partition_paths(config, partition)["raw"])
    started = time.perf_counter()
    files = runner.write_partition_topgo(config, partition, raw)
    exported = pl.concat([t for t in topgo_tables(raw).values()]) if raw.height else None
    missing = (
        exported.join(
            raw.select("accession", "go_id", "reliability_index").unique(),
            on=["accession", "go_id", "reliability_index"],
            how="anti",
        ).height
        if exported is not None
        else 0
    )
    lines = exported.height if exported is not None else 0
    record_lineage(
        context, lineage, state, {"lines": lines}, {"write": time.perf_counter() - started}, partition
    )
    return dg.MaterializeResult(
        metadata={"files": dg.MetadataValue.json([str(f) for f in files]), "lines": lines},
        check_results=[
            dg.AssetCheckResult(
                check_name="topgo_rows_in_raw_rows", passed=missing == 0, metadata={"not_in_raw": missing}
            )
        ],
    )
