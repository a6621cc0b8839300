"""How a partition's queries are cut into blocks for the Dask workers (pure: no Dask, no I/O).

`plan_blocks` sizes blocks of whole search batches so that the reference matrix, the engine's
workspace and one block per worker thread (plus one queued) fit `MEMORY_SHARE` of the smallest
worker's memory limit; the rest is left to the interpreter, torch and Dask's buffers (Dask
pauses a worker at 80 % of its limit and its nanny kills it at 95 %). A worker paused anyway is
seen by the driver while it waits (`DaskSearch`), and named.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from fantasia_assets.errors import FantasiaError

log = logging.getLogger(__name__)

# Share of a worker's memory limit the search plans for: Dask pauses a worker at 80 % of its
# limit and its nanny kills it at 95 %, and the interpreter, torch and Dask's own buffers take
# a few hundred MiB besides the matrix and the blocks.
MEMORY_SHARE = 0.5
# Bytes per reference value while a worker builds its engine: the float16 cache file plus the
# engine's float32 copy (the float16 copy is dropped once built).
_REFERENCE_BYTES_PER_VALUE = 6
# Bytes per query value of a block on a worker: the float32 block, the engine's float32 copy
# and float64 refinement rows.
_QUERY_BYTES_PER_VALUE = 16
# Screening workspace of the engine on a CPU worker (the engine's own cap on the CPU).
_ENGINE_BUDGET_CAP = 512 * 2**20
# Blocks per worker thread when memory allows more: enough to balance uneven workers and to
# lose little work when one dies, few enough that per-task overhead stays negligible.
_BLOCKS_PER_THREAD = 4


class ClusterError(FantasiaError, RuntimeError):
    """The Dask cluster cannot run the search: unreachable, other code, too little memory."""


# ---------------------------------------------------------------------------------------------
# block sizes (pure)


@dataclass(frozen=True)
class WorkerFacts:
    """What the driver knows of one worker: its code version, memory limit (bytes) and threads."""

    address: str
    version: str
    memory_limit: int
    threads: int
    used: int = 0  # bytes the worker process holds now (the scheduler's last report), for messages


@dataclass(frozen=True)
class BlockPlan:
    """Queries per block (whole batches, the last block may be shorter) and the engine's budget."""

    block_queries: int
    engine_budget: int  # bytes of screening workspace on a CPU worker
    n_blocks: int


def _gib(n_bytes: float) -> str:
    return f"{n_bytes / 2**30:.2f} GiB"


def plan_blocks(
    n_queries: int, batch: int, dim: int, n_references: int, workers: list[WorkerFacts], label: str = ""
) -> BlockPlan:
    """Blocks of whole batches that fit the smallest worker memory limit.

    The reference matrix (float16 while loading, float32 in the engine), the engine's
    workspace and one block per worker thread (plus one queued) must fit in `MEMORY_SHARE` of
    the limit. Blocks are then as small as balancing asks (`_BLOCKS_PER_THREAD` per thread),
    never smaller than one batch. Raises ClusterError when the matrix or a single batch does
    not fit: a batch is never cut, so the searches are the in-process ones.
    """
    if not workers:
        raise ClusterError(f"the Dask cluster has no workers to search {label}")
    batch = max(1, min(batch, n_queries))
    threads = max(w.threads for w in workers)
    slots = sum(w.threads for w in workers)
    balanced = math.ceil(math.ceil(n_queries / (slots * _BLOCKS_PER_THREAD)) / batch) * batch
    smallest = min(workers, key=lambda w: (w.memory_limit, w.address))
    usable = MEMORY_SHARE * smallest.memory_limit
    matrix_bytes = _REFERENCE_BYTES_PER_VALUE * n_references * dim
    spare = usable - matrix_bytes
    where = (
        f"worker {smallest.address} (memory limit {_gib(smallest.memory_limit)}, planned share "
        f"{MEMORY_SHARE:.0%}; the worker process itself held {_gib(smallest.used)})"
    )
    if spare <= 0:
        raise ClusterError(
            f"the reference matrix of {label} ({n_references} × {dim}) needs {_gib(matrix_bytes)} "
            f"on a worker, more than {where} allows; give the workers more memory"
        )
    engine_budget = int(min(spare / 2, _ENGINE_BUDGET_CAP))
    per_query = _QUERY_BYTES_PER_VALUE * dim
    fitting = int((spare - engine_budget) // ((threads + 1) * per_query))
    if fitting < batch:
        raise ClusterError(
            f"one search batch of {batch} queries of {label} with its reference matrix "
            f"({n_references} × {dim}) needs more memory than {where} allows; lower "
            "lookup.batch_size (or the model's batch_size) or give the workers more memory"
        )
    block = min(fitting // batch * batch, max(batch, balanced))
    if block < balanced:
        log.info("%s: blocks of %d queries to fit %s", label, block, where)
    return BlockPlan(block, engine_budget, math.ceil(n_queries / block))


def minimum_memory_limit(n_references: int, dim: int, block_queries: int, threads: int = 1) -> int:
    """The smallest worker memory limit for which `plan_blocks` allows blocks of `block_queries`."""
    per_block = (threads + 1) * _QUERY_BYTES_PER_VALUE * dim * block_queries
    # the engine's budget takes half of the spare memory, up to its cap
    spare = 2 * per_block if per_block <= _ENGINE_BUDGET_CAP else per_block + _ENGINE_BUDGET_CAP
    return math.ceil((_REFERENCE_BYTES_PER_VALUE * n_references * dim + spare) / MEMORY_SHARE) + 1
