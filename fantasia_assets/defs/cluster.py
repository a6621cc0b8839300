"""The partition job on an existing Dask cluster: dagster-dask's executor, scheduler from the environment.

`lookup_partition_dask_job` is `lookup_partition_job` (references → neighbours → raw rows →
TopGO of one (model, layer)) whose steps run as tasks of the Dask scheduler at
`$FANTASIA_DASK_SCHEDULER`, so a backfill over many partitions spreads over the cluster's
workers. The workers need this code, the same `$DAGSTER_HOME`, `$FANTASIA_HOME` (shared file
system), `FANTASIA_CONFIG` and `FANTASIA_DATABASE_URL` as the process that launches the run;
`neighbour_hits` asks for one `GPU` worker resource (`lookup.GPU_OP_TAGS`), so start the
workers that should search with `--resources GPU=1`.
"""

import dagster as dg
from dagster_dask import dask_executor

from ..core.distributed import SCHEDULER_ENV
from .lookup import neighbour_hits, raw_result_shards, reference_embeddings, topgo_exports

cluster_executor = dask_executor.configured(
    {"cluster": {"existing": {"address": {"env": SCHEDULER_ENV}}}}, name="dask_existing_cluster"
)

partition_dask_job = dg.define_asset_job(
    "lookup_partition_dask_job",
    selection=[reference_embeddings, neighbour_hits, raw_result_shards, topgo_exports],
    executor_def=cluster_executor,
    description="lookup_partition_job with its steps on the Dask cluster at $FANTASIA_DASK_SCHEDULER.",
)
