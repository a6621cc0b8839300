"""Exact k-NN search of a partition's query blocks on an existing Dask cluster, same results as in-process.

The driver (the CLI's lookup) cuts a partition's usable queries into blocks of whole search
batches, sized from the workers' memory limits as the scheduler reports them, and submits one
task per block. A worker loads the partition's reference matrix once, from the shared cache
file the driver's `ReferenceStore` wrote under `$FANTASIA_HOME/cache/references` (never
through the scheduler), builds a `SearchEngine` on it and keeps it for the partition's later
blocks. Each block is searched batch by batch exactly as the in-process loop does, and the
driver gathers the per-batch (distances, indices) in query order, so everything built from
them is byte-identical to an in-process run. The search is exact (`core.knn`), so a worker's
device (CUDA or CPU) does not change a result.

Workers whose code differs from the driver's (package version and a digest of its .py files)
are refused before anything is submitted. A worker that dies mid-block is Dask's business: the
scheduler hands the block to another worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fantasia_assets import __version__
from fantasia_assets.errors import FantasiaError

if TYPE_CHECKING:  # stages imports this module: these are for annotations only
    from .plan import Partition
    from .references import ReferenceMatrix
    from .stages import BatchSearch, SearchSettings

log = logging.getLogger(__name__)

SCHEDULER_ENV = "FANTASIA_DASK_SCHEDULER"
TIMEOUT_ENV = "FANTASIA_DASK_TIMEOUT"  # seconds to wait for the scheduler and a first worker
CONNECT_TIMEOUT_S = 10.0
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
_ENGINES_KEPT = 1  # matrices a worker keeps: one partition is searched at a time

Batches = list[tuple[np.ndarray, np.ndarray]]  # (distances, indices) per search batch
Exclusions = tuple[np.ndarray, np.ndarray]  # CSR (indptr, ref_indices), as `SearchEngine.search`


class ClusterError(FantasiaError, RuntimeError):
    """The Dask cluster cannot run the search: unreachable, other code, too little memory."""


# ---------------------------------------------------------------------------------------------
# code version


_code_version: str | None = None


def code_version() -> str:
    """``{package version}+{digest}`` of this process's fantasia_assets: its .py files by path."""
    global _code_version
    if _code_version is None:
        package = Path(__file__).resolve().parent.parent
        digest = hashlib.sha256()
        for path in sorted(package.rglob("*.py")):
            digest.update(path.relative_to(package).as_posix().encode() + b"\0")
            digest.update(path.read_bytes() + b"\0")
        _code_version = f"{__version__}+{digest.hexdigest()[:16]}"
    return _code_version


# ---------------------------------------------------------------------------------------------
# block sizes (pure)


@dataclass(frozen=True)
class WorkerFacts:
    """What the driver knows of one worker: its code version, memory limit (bytes) and threads."""

    address: str
    version: str
    memory_limit: int
    threads: int


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
    smallest = min(workers, key=lambda w: w.memory_limit)
    usable = MEMORY_SHARE * smallest.memory_limit
    matrix_bytes = _REFERENCE_BYTES_PER_VALUE * n_references * dim
    spare = usable - matrix_bytes
    where = f"worker {smallest.address} (memory limit {_gib(smallest.memory_limit)}, planned share {MEMORY_SHARE:.0%})"
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


# ---------------------------------------------------------------------------------------------
# worker side


@dataclass(frozen=True)
class MatrixFile:
    """Where workers find a partition's reference matrix, and what it must hold."""

    path: str  # the driver's cache file: a path every worker can read (shared $FANTASIA_HOME)
    fingerprint: str
    n_references: int
    dim: int
    # where the workers' engines keep their prepared operands of these rows (`knn_reference`),
    # beside the cache file: a later run's workers read them instead of preparing them again
    kept_operands: str | None = None


@dataclass(frozen=True)
class BlockSettings:
    """What a worker needs to search a block exactly as the in-process loop does."""

    metric: str
    backend: str
    use_gpu: bool
    k: int
    threshold: float | None
    tie_expansion: bool
    batch: int
    engine_budget: int | None
    screening: str = "auto"  # `core.screen`: the screen's arithmetic; results never depend on it


_engines: dict[tuple, object] = {}
_engines_lock = threading.Lock()


def _worker_engine(matrix: MatrixFile, settings: BlockSettings):
    """The worker's engine on the matrix, built from the shared cache file on first use."""
    from .device import resolve_device
    from .knn import SearchEngine

    device = resolve_device(settings.backend, use_gpu=settings.use_gpu)
    budget = settings.engine_budget if device == "cpu" else None
    key = (matrix.fingerprint, settings.metric, settings.backend, device, budget, settings.screening)
    with _engines_lock:
        if key in _engines:
            return _engines[key]
        _engines.clear()  # free the previous partition's matrix before loading the next
        try:
            vectors = np.load(matrix.path, mmap_mode="r")  # the driver's float16 .npy, mapped
        except (OSError, ValueError) as exc:
            raise ClusterError(
                f"a Dask worker cannot read the reference cache {matrix.path} ({exc}); "
                "$FANTASIA_HOME must be on a file system the workers share"
            ) from exc
        if vectors.shape != (matrix.n_references, matrix.dim):
            raise ClusterError(
                f"the reference cache {matrix.path} seen by a Dask worker holds {vectors.shape}, "
                f"the driver's {(matrix.n_references, matrix.dim)}: is $FANTASIA_HOME shared?"
            )
        kept = None if matrix.kept_operands is None else Path(matrix.kept_operands)
        engine = SearchEngine(
            settings.metric, settings.backend, device, budget, screening=settings.screening
        ).build(vectors, kept=kept)
        del vectors
        lock = threading.Lock()
        _engines[key] = (engine, lock)
        while len(_engines) > _ENGINES_KEPT:
            _engines.pop(next(iter(_engines)))
        return engine, lock


def search_block(
    matrix: MatrixFile,
    settings: BlockSettings,
    queries: np.ndarray,
    exclude: Exclusions | None,
    driver_version: str,
) -> Batches:
    """Run on a worker: the block's batches searched one after the other, as in-process."""
    if code_version() != driver_version:
        raise ClusterError(
            f"a Dask worker runs fantasia-assets {code_version()}, the driver {driver_version}; "
            "start the workers from the same code"
        )
    engine, lock = _worker_engine(matrix, settings)
    batches = []
    with lock:  # the engine keeps buffers between calls: one search at a time
        for start in range(0, len(queries), settings.batch):
            stop = min(start + settings.batch, len(queries))
            distances, indices = engine.search(
                queries[start:stop],
                settings.k,
                threshold=settings.threshold,
                exclude=slice_exclusions(exclude, start, stop),
                tie_expansion=settings.tie_expansion,
            )
            batches.append((distances, indices))
    return batches


def slice_exclusions(exclude: Exclusions | None, start: int, stop: int) -> Exclusions | None:
    """Rows [start, stop) of an exclusion CSR, renumbered from 0."""
    if exclude is None:
        return None
    indptr, indices = exclude
    return indptr[start : stop + 1] - indptr[start], indices[indptr[start] : indptr[stop]]


def _worker_facts() -> tuple[str, int]:
    """Run on each worker by `client.run`: (code version, total memory of its host).

    The host's memory stands in for the limit of a worker started without one."""
    import psutil

    return code_version(), int(psutil.virtual_memory().total)


# ---------------------------------------------------------------------------------------------
# driver side


def connect_from_environment() -> DaskSearch | None:
    """A `DaskSearch` on `$FANTASIA_DASK_SCHEDULER`, or None when the variable is unset or empty."""
    address = os.environ.get(SCHEDULER_ENV, "").strip()
    if not address:
        return None
    raw_timeout = os.environ.get(TIMEOUT_ENV, "").strip()
    try:
        timeout = float(raw_timeout) if raw_timeout else CONNECT_TIMEOUT_S
    except ValueError:
        raise ClusterError(f"{TIMEOUT_ENV}={raw_timeout!r} is not a number of seconds") from None
    return DaskSearch(address, timeout)


class DaskSearch:
    """A connection to an existing Dask scheduler that searches query blocks on its workers.

    Connecting checks that the scheduler answers, that it has workers and that they run this
    code; each `search` re-reads the workers (they may come and go) and plans its blocks.
    """

    def __init__(self, address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
        from distributed import Client

        self.address = address
        self.version = code_version()
        self.plans: dict[str, BlockPlan] = {}  # by label (partition), for reports and tests
        try:
            self.client = Client(address, timeout=timeout, set_as_default=False)
        except (OSError, TimeoutError, ValueError) as exc:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {address} ({SCHEDULER_ENV}): "
                f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no answer'}"
            ) from None
        try:
            self.workers(timeout)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()

    def __enter__(self) -> DaskSearch:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def workers(self, timeout: float = CONNECT_TIMEOUT_S) -> list[WorkerFacts]:
        """The workers now, refused when any runs other code than this process."""
        try:
            self.client.wait_for_workers(1, timeout=timeout)
        except TimeoutError:
            raise ClusterError(
                f"the Dask scheduler at {self.address} has no worker (waited {timeout:.0f} s)"
            ) from None
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        facts = self.client.run(_worker_facts)
        others = {address: version for address, (version, _) in facts.items() if version != self.version}
        host_memory = min(total for _, total in facts.values())
        if others:
            listed = ", ".join(f"{address} runs {version}" for address, version in sorted(others.items()))
            raise ClusterError(
                f"Dask workers run other code than this process ({self.version}): {listed}; "
                "start the workers from the same fantasia-assets code"
            )
        return [
            WorkerFacts(
                address,
                self.version,
                int(info[address].get("memory_limit") or 0) or host_memory,
                int(info[address].get("nthreads") or 1),
            )
            for address in sorted(facts)
            if address in info
        ]

    def search(
        self,
        matrix: MatrixFile,
        settings: BlockSettings,
        queries: np.ndarray,
        exclude: Exclusions | None,
        label: str,
    ) -> Iterator[tuple[int, tuple[np.ndarray, np.ndarray]]]:
        """(start row, (distances, indices)) of every batch of `settings.batch` queries, in order."""
        from distributed import KilledWorker

        plan = plan_blocks(
            len(queries), settings.batch, matrix.dim, matrix.n_references, self.workers(), label
        )
        self.plans[label] = plan
        settings = BlockSettings(**{**settings.__dict__, "engine_budget": plan.engine_budget})
        run = uuid.uuid4().hex[:8]
        futures = []
        for number, start in enumerate(range(0, len(queries), plan.block_queries)):
            stop = min(start + plan.block_queries, len(queries))
            futures.append(
                self.client.submit(
                    search_block,
                    matrix,
                    settings,
                    np.ascontiguousarray(queries[start:stop]),
                    slice_exclusions(exclude, start, stop),
                    self.version,
                    key=f"fantasia-search-{run}-{number}",
                    pure=False,
                )
            )
        try:
            for number, future in enumerate(futures):
                base = number * plan.block_queries
                for offset, found in enumerate(future.result()):
                    yield base + offset * settings.batch, found
        except KilledWorker as exc:
            raise ClusterError(
                f"a search block of {label} killed Dask workers repeatedly ({exc}); "
                "see the workers' logs (memory?)"
            ) from None
        except (OSError, TimeoutError) as exc:
            raise ClusterError(f"lost the Dask scheduler at {self.address} during {label}: {exc}") from None
        finally:
            self.client.cancel([f for f in futures if not f.done()])


def cluster_search(
    cluster: DaskSearch,
    partition: Partition,
    matrix_file: Path,
    matrix: ReferenceMatrix,
    settings: SearchSettings,
    use_gpu: bool,
    kept_operands: Path | None = None,
) -> BatchSearch:
    """The partition's batches searched in blocks on the cluster; `kept_operands`: the prefix
    where the workers' engines keep their prepared operands (`MatrixFile`)."""
    kept = None if kept_operands is None else str(kept_operands)
    where = MatrixFile(str(matrix_file), matrix.fingerprint, len(matrix), matrix.dim, kept)

    def search(vectors: np.ndarray, exclude, batch: int):
        block = BlockSettings(
            metric=settings.metric,
            backend=settings.backend,
            use_gpu=use_gpu,
            k=settings.limit_per_entry,
            threshold=partition.model.distance_threshold,
            tie_expansion=settings.tie_expansion,
            batch=batch,
            engine_budget=0,  # set by the block plan
            screening=settings.screening,
        )
        return cluster.search(where, block, vectors, exclude, partition.key)

    return search
