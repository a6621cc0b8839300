"""The lookup assets: shared caches, then per (model, layer) references → neighbours → rows → TopGO.

Each asset opens the lookup state, calls one stage through `fantasia_assets.runner` and reports
what it did; the science stays in `core/`. What an asset hands to the next one travels through
files and caches, so each records in its metadata the fingerprint of what it consumed (reference
matrix, clusters, hits, raw rows); the checks of `checks.py` read what was written.
"""

import dagster as dg
import polars as pl

from .. import runner
from ..core import redundancy, stages
from ..core.locks import experiment_lock
from ..core.summary import TOPGO_CODE_VERSION
from ..core.timing import timed
from ..core.writers import OUTPUT_FORMAT_VERSION
from ..db.stores import ANNOTATIONS_CODE_VERSION, MATRIX_CODE_VERSION, AnnotationStore
from ..incremental_run import PartitionUpdates
from ..paths import cache_dir
from ..progress import log_progress
from .inputs import go_ontology, query_embeddings, reference_set
from .metadata import best_predictions, clusters_version, distance_histogram, files_version, timings_table
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
    code_version=ANNOTATIONS_CODE_VERSION,
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
    timings: dict[str, float] = {}
    with timed(timings, "fetch"):
        first = next(iter(state.partitions.values()), None)
        scope = runner.reference_scope(state.config, first) if first else None
        annotations, version = AnnotationStore(state.engine, cache_dir("annotations")).get(scope)
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
    code_version=redundancy.CODE_VERSION,
    group_name="lookup",
    deps=[reference_set, query_embeddings],
    kinds={"mmseqs2"},
    description="MMseqs2 clusters of all reference and query sequences (SPEC §3.5), computed once per "
    "(reference set, query set, identity, coverage, binary) and cached; off when redundancy.identity "
    "is 0. Data version: fingerprint of the clusters, which neighbour_hits records as consumed.",
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
        return dg.MaterializeResult(
            metadata={"masking": "off (lookup.redundancy.identity is 0)"}, data_version=dg.DataVersion("off")
        )
    binary = mmseqs.binary()
    timings: dict[str, float] = {}
    with timed(timings, "cluster"):
        clusters = runner.redundancy_clusters(
            state.config, state.queries, state.engine, list(state.partitions.values()), cache_dir("mmseqs"),
            log_progress(context.log), binary=binary,
        )  # fmt: skip
    counts = {"sequences": len(clusters or {}), "clusters": len(set((clusters or {}).values()))}
    record_lineage(context, lineage, state, counts, timings)
    version = clusters_version(clusters)
    return dg.MaterializeResult(
        metadata={**counts, "binary": binary, "clusters_version": version, "seconds": timings["cluster"]},
        data_version=dg.DataVersion(version),
    )


@dg.asset(
    code_version=MATRIX_CODE_VERSION,
    partitions_def=MODEL_LAYER,
    group_name="lookup",
    deps=[reference_set],
    kinds={"postgres", "numpy"},
    description="The (model, layer) reference matrix streamed from PostgreSQL, cached on disk by "
    "fingerprint so unchanged references are never fetched twice; the steps of a run share it in "
    "memory (lookup.lookup_cache_max).",
)
def reference_embeddings(
    context: dg.AssetExecutionContext,
    settings: LookupSettings,
    database: ReferenceDatabase,
    lineage: LineageStore,
) -> dg.MaterializeResult:
    state = LookupState.open(settings, database)
    partition = state.partition(context.partition_key)
    store = state.reference_store()
    timings: dict[str, float] = {}
    with timed(timings, "fetch"):
        matrix = store.get(runner.reference_scope(state.config, partition), log_progress(context.log))
    version = record_lineage(context, lineage, state, {"references": len(matrix)}, timings, partition)
    return dg.MaterializeResult(
        metadata={
            "references": len(matrix),
            "dimensions": matrix.dim,
            "source": store.last_source,
            "matrix_file": dg.MetadataValue.path(str(store.cache_file(matrix.fingerprint))),
            "matrix_fingerprint": matrix.fingerprint,
            "reference_version": version,
            "seconds": timings["fetch"],
        },
        data_version=dg.DataVersion(version),
    )


@dg.asset(
    code_version=stages.SEARCH_CODE_VERSION,
    partitions_def=MODEL_LAYER,
    group_name="lookup",
    deps=[reference_embeddings, query_embeddings, mmseqs_clusters],
    kinds={"torch", "parquet"},
    pool=GPU_POOL,
    op_tags=GPU_OP_TAGS,
    description="Exact k nearest references of every query (blocked matmul + top-k on the GPU "
    "when there is one), written once as Parquet. Data version: digest of the written files.",
)
def neighbour_hits(
    context: dg.AssetExecutionContext,
    settings: LookupSettings,
    database: ReferenceDatabase,
    device: ComputeDevice,
    mmseqs: MMseqs,
    lineage: LineageStore,
) -> dg.MaterializeResult:
    state = LookupState.open(settings, database)
    config, partition = state.config, state.partition(context.partition_key)
    binary = mmseqs.binary() if config.redundancy.identity > 0 else None
    clusters = runner.redundancy_clusters(
        config,
        state.queries,
        state.engine,
        list(state.partitions.values()),
        cache_dir("mmseqs"),
        binary=binary,
    )
    where = device.device(config)
    annotations = None
    if config.per_aspect:  # which references serve which aspect: the annotation cache's categories
        scope = runner.reference_scope(config, partition)
        annotations = AnnotationStore(state.engine, cache_dir("annotations")).get(scope)[0]
    # incremental: only what changed since the partition's stored state is searched
    updates = PartitionUpdates(config)
    outcome = updates.search(
        state.queries, partition, state.reference_store(), clusters, where, log_progress(context.log), None,
        annotations,
    )  # fmt: skip
    paths = runner.write_hits(config, partition, outcome)
    with experiment_lock(config.experiment_path, probe=False):
        updates.stage(config.experiment_path, partition, outputs=("hits",))
    update = updates.updates[partition.key]
    counts = {"queries": outcome.n_queries, "neighbours": outcome.hits.height}
    version = record_lineage(context, lineage, state, counts, outcome.timings, partition)
    written = files_version([paths["hits"], paths["no_hits"], paths["skipped"]])
    return dg.MaterializeResult(
        metadata={
            **counts,
            "queries_without_neighbours": len(outcome.queries_without_hits),
            "left_out": len(outcome.skipped),
            "device": where,
            "update_kind": update.kind,
            "update_reason": update.reason or "",
            "queries_searched": update.searched,
            "queries_merged": update.merged,
            "reference_version": version,
            "query_version": state.queries.content_hash,
            "consumed_matrix": f"{outcome.matrix.fingerprint} (from {outcome.matrix_source})",
            "consumed_clusters": clusters_version(clusters),
            "hits": dg.MetadataValue.path(str(paths["hits"])),
            "distance_histogram": dg.MetadataValue.md(
                distance_histogram(outcome.hits["distance"].to_numpy())
            ),
            "timings": dg.MetadataValue.md(timings_table(outcome.timings)),
        },
        data_version=dg.DataVersion(written),
    )


@dg.asset(
    code_version=f"{stages.RAW_ROWS_CODE_VERSION}+{OUTPUT_FORMAT_VERSION}",
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
    paths = runner.partition_paths(config, partition)
    hits = runner.read_hits(config, partition)
    consumed_hits = files_version([paths["hits"], paths["no_hits"], paths["skipped"]])
    annotations, annotation_version = AnnotationStore(state.engine, cache_dir("annotations")).get(
        runner.reference_scope(config, partition)
    )
    timings: dict[str, float] = {}
    raw = runner.build_raw_rows(
        config, state.queries, partition, hits, annotations, state.engine, timings=timings
    )
    with timed(timings, "write"):
        runner.write_raw(config, partition, raw, state.queries)
    counts = {"rows": raw.height, "accessions": raw["accession"].n_unique()}
    version = record_lineage(context, lineage, state, counts, timings, partition)
    return dg.MaterializeResult(
        metadata={
            **counts,
            "shards": dg.MetadataValue.path(str(paths["shards"])),
            "raw_rows": dg.MetadataValue.path(str(paths["raw"])),
            "reference_version": version,
            "query_version": state.queries.content_hash,
            "config_version": config.fingerprint(),
            # the daily backstop compares it with the reference and query versions
            "search_config_version": config.results_fingerprint(partition=True),
            "consumed_hits": consumed_hits,
            "consumed_annotations": annotation_version,
            "best_predictions": dg.MetadataValue.md(best_predictions(raw)),
            "timings": dg.MetadataValue.md(timings_table(timings)),
        },
        data_version=dg.DataVersion(files_version([paths["raw"]])),
    )


@dg.asset(
    code_version=f"{TOPGO_CODE_VERSION}+{OUTPUT_FORMAT_VERSION}",
    partitions_def=MODEL_LAYER,
    group_name="outputs",
    deps=[raw_result_shards],
    kinds={"topgo"},
    description="topgo/{model}/layer_{k}/{category}.topgo: best RI per (accession, GO term); "
    "nothing is written when lookup.topgo is false.",
)
def topgo_exports(
    context: dg.AssetExecutionContext,
    settings: LookupSettings,
    database: ReferenceDatabase,
    lineage: LineageStore,
) -> dg.MaterializeResult:
    state = LookupState.open(settings, database)
    config, partition = state.config, state.partition(context.partition_key)
    if not config.topgo:
        return dg.MaterializeResult(metadata={"topgo": "off (lookup.topgo is false)"})
    source = runner.partition_paths(config, partition)["raw"]
    raw = pl.read_parquet(source)
    timings: dict[str, float] = {}
    with timed(timings, "write"):
        files = runner.write_partition_topgo(config, partition, raw)
    lines = sum(len(f.read_bytes().splitlines()) for f in files)
    record_lineage(context, lineage, state, {"lines": lines}, timings, partition)
    return dg.MaterializeResult(
        metadata={
            "files": dg.MetadataValue.json([str(f) for f in files]),
            "lines": lines,
            "consumed_raw_rows": f"{source} ({files_version([source])})",
        }
    )
