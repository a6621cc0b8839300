"""The partition job on an existing Dask cluster: dagster-dask's executor, scheduler from the environment.

`lookup_partition_dask_job` is `lookup_partition_job` (references → neighbours → raw rows →
TopGO of one (model, layer)) whose steps run as tasks of the Dask scheduler at
`$FANTASIA_DASK_SCHEDULER`, so a backfill over many partitions spreads over the cluster's
workers. The workers need this code, the same `$DAGSTER_HOME`, `$FANTASIA_HOME` (shared file
system), `FANTASIA_CONFIG` and `FANTASIA_DATABASE_URL` as the process that launches the run;
`neighbour_hits` asks for one `GPU` worker resource (`lookup.GPU_OP_TAGS`), so start the
workers that should search with `--resources GPU=1`.

Why a subclass of dagster-dask's `DaskExecutor`: its `execute` hands the run (`DagsterRun`)
and the plan's known state to `Client.submit` as plain arguments, and Dask ≥ 2025's task-spec
parser walks every tuple argument, named tuples included, into Dagster's `@record`s, which
forbid iteration (the run of a job with a concurrency pool carries one): the submit fails.
Here each step's arguments travel in one object Dask does not walk, and the worker calls
dagster-dask's own `query_on_dask_worker` with them; steps are ordered by their execution
dependencies and placed by their `dagster-dask/resource_requirements` tag, as dagster-dask does.
"""

from __future__ import annotations

import os

import dagster as dg
import dask.distributed
from dagster import Field, StringSource
from dagster._core.definitions.executor_definition import executor
from dagster._utils import iterate_with_context
from dagster_dask.executor import DaskExecutor, get_dask_resource_requirements, query_on_dask_worker

from ..core.distributed import (
    POLL_S,
    SCHEDULER_ENV,
    ClusterError,
    WorkerWatch,
    connect,
    no_worker,
    timeout_from_environment,
)
from .lookup import neighbour_hits, raw_result_shards, reference_embeddings, topgo_exports


class StepCall:
    """The arguments of one step's task, opaque to Dask's task-spec parser (see the module docstring)."""

    def __init__(self, **arguments) -> None:
        self.arguments = arguments


def run_step(dependencies: list, call: StepCall):
    """On a worker: the step's events (the dependencies' results only order the tasks)."""
    return query_on_dask_worker(dependencies, **call.arguments)


class ClusterExecutor(DaskExecutor):
    """dagster-dask's executor on an existing scheduler, with the step arguments wrapped.

    It connects within `$FANTASIA_DASK_TIMEOUT` seconds (a port that is not a scheduler's is
    refused, `probe_scheduler`), refuses a plan whose steps ask for a worker resource no worker
    offers (`neighbour_hits`'s `GPU`: Dask would keep the task waiting forever), and while it
    waits for steps it fails the run when no worker has run for that long."""

    def execute(self, plan_context, execution_plan):
        from dagster._core.errors import raise_execution_interrupts

        if not plan_context.instance.is_persistent:
            raise dg.DagsterInvariantViolationError("Dask execution needs a persistent Dagster instance")
        instance_ref = plan_context.instance.get_ref()
        address = self.cluster_configuration["address"]
        timeout = timeout_from_environment()
        with connect(address, timeout, set_as_default=True) as client:  # the default: `wait` uses it
            steps = [step for level in execution_plan.get_steps_to_execute_by_level() for step in level]
            _check_resources(client, steps, address, timeout)
            futures = {}
            for step in steps:
                dependencies = [
                    futures[key] for key in sorted(step.get_execution_dependency_keys()) if key in futures
                ]
                call = StepCall(
                    recon_job=plan_context.reconstructable_job,
                    dagster_run=plan_context.dagster_run,
                    run_config=plan_context.run_config,
                    step_keys=[step.key],
                    instance_ref=instance_ref,
                    known_state=execution_plan.known_state,
                )
                futures[step.key] = client.submit(
                    run_step,
                    dependencies,
                    call,
                    key=f"{plan_context.job_name}.{plan_context.run_id}.{step.key}",
                    resources=get_dask_resource_requirements(step.tags),
                    pure=False,
                )
            for events in iterate_with_context(
                raise_execution_interrupts, _as_done(client, futures, address, timeout)
            ):
                yield from events


def _check_resources(client, steps, address: str, timeout: float) -> None:
    """Refuse steps that ask for a worker resource (`GPU: 1`) no worker of the cluster offers."""
    try:
        client.wait_for_workers(1, timeout=timeout)
    except TimeoutError:
        raise ClusterError(no_worker(client, address, f"waited {timeout:.0f} s")) from None
    offered: dict[str, float] = {}
    for worker in client.scheduler_info(n_workers=-1)["workers"].values():
        for name, amount in (worker.get("resources") or {}).items():
            offered[name] = max(offered.get(name, 0), amount)
    for step in steps:
        for name, amount in get_dask_resource_requirements(step.tags).items():
            if offered.get(name, 0) < amount:
                raise ClusterError(
                    f"step {step.key} asks for the Dask worker resource {name}={amount:g}, which no worker "
                    f"of {address} offers (offered: {offered or 'none'}); start the workers that should "
                    f"run it with `--resources {name}={amount:g}`"
                )


def _as_done(client, futures: dict, address: str, timeout: float):
    """Each step's events as it ends; a step that failed on its worker ends the wait at once (its
    dependants cannot run), and a cluster without a running worker for `timeout` s is an error."""
    pending = set(futures.values())
    watch = WorkerWatch(client, timeout)
    while pending:
        try:
            done, pending = dask.distributed.wait(pending, timeout=POLL_S, return_when="FIRST_COMPLETED")
        except TimeoutError:
            done = set()
        for future in done:
            yield future.result()  # a task's own exception (not a step failure) is raised here
        if watch.lost(progressed=bool(done)):
            how_long = f"for {timeout:.0f} s; the run's remaining steps cannot run"
            raise ClusterError(no_worker(client, address, how_long))


@executor(
    name="dask_existing_cluster",
    requirements=dg.multiple_process_executor_requirements(),
    config_schema={
        "address": Field(
            StringSource,
            is_required=False,
            description=f"The Dask scheduler's address; default ${SCHEDULER_ENV}.",
        )
    },
)
def cluster_executor(init_context) -> ClusterExecutor:
    """Steps as tasks on the existing Dask scheduler at `address`, else `$FANTASIA_DASK_SCHEDULER`.

    The variable is read here, where the run is orchestrated, not in the run's configuration:
    workers rebuild the plan from that configuration and need not have it set.
    """
    address = init_context.executor_config.get("address") or os.environ.get(SCHEDULER_ENV, "").strip()
    if not address:
        raise ClusterError(
            f"{SCHEDULER_ENV} is not set: the address of the Dask scheduler to run the steps on"
        )
    return ClusterExecutor("existing", {"address": address})


partition_dask_job = dg.define_asset_job(
    "lookup_partition_dask_job",
    selection=[reference_embeddings, neighbour_hits, raw_result_shards, topgo_exports],
    executor_def=cluster_executor,
    description="lookup_partition_job with its steps on the Dask cluster at $FANTASIA_DASK_SCHEDULER.",
)
