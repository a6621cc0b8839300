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
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from fantasia_assets import __version__

from .cluster_plan import (  # noqa: F401  (re-exported: the driver's API and its tests')
    MEMORY_SHARE,
    BlockPlan,
    ClusterError,
    WorkerFacts,
    minimum_memory_limit,
    plan_blocks,
)

if TYPE_CHECKING:  # stages imports this module: these are for annotations only
    from .plan import Partition
    from .references import ReferenceMatrix
    from .stages import BatchSearch, SearchSettings

log = logging.getLogger(__name__)

SCHEDULER_ENV = "FANTASIA_DASK_SCHEDULER"
TIMEOUT_ENV = "FANTASIA_DASK_TIMEOUT"  # seconds to wait for the scheduler and a first worker
CONNECT_TIMEOUT_S = 10.0
_ENGINES_KEPT = 1  # matrices a worker keeps: one partition is searched at a time
POLL_S = 1.0  # how often a driver, waiting on its tasks, looks whether any worker still runs

Batches = list[tuple[np.ndarray, np.ndarray]]  # (distances, indices) per search batch
Exclusions = tuple[np.ndarray, np.ndarray]  # CSR (indptr, ref_indices), as `SearchEngine.search`


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
    return DaskSearch(address, timeout_from_environment())


def timeout_from_environment() -> float:
    """`$FANTASIA_DASK_TIMEOUT` in seconds (default `CONNECT_TIMEOUT_S`): a positive finite number."""
    raw = os.environ.get(TIMEOUT_ENV, "").strip()
    if not raw:
        return CONNECT_TIMEOUT_S
    try:
        timeout = float(raw)
    except ValueError:
        timeout = math.nan
    if not (math.isfinite(timeout) and 0 < timeout <= 86400):
        raise ClusterError(f"{TIMEOUT_ENV}={raw!r}: give a number of seconds above 0 (at most a day)")
    return timeout


def probe_scheduler(address: str, timeout: float) -> None:
    """Refuse, in `timeout` seconds at most, a TCP address whose server does not greet as a Dask
    scheduler does (its handshake comes unasked, at once): the dashboard's HTTP port (8787 for
    8786, a usual mix-up) accepts the connection and then waits forever for a request, and the
    client's own connect timeout does not bound that wait. Other protocols are left to Dask."""
    import socket

    scheme, _, rest = address.rpartition("://")
    if scheme not in ("", "tcp"):
        return
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return  # Dask's own parsing names what is wrong
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout) as sock:
            sock.settimeout(min(timeout, 5.0))
            greeting = sock.recv(1)
    except TimeoutError:
        greeting = None
    except OSError:
        return  # unreachable: Dask's connect says so, within the timeout
    if not greeting:
        raise ClusterError(
            f"{address} ({SCHEDULER_ENV}) accepts connections but does not answer as a Dask "
            "scheduler: is it another port of the scheduler's host, such as its dashboard (8787) "
            "instead of the scheduler (8786)?"
        )


def connect(address: str, timeout: float, set_as_default: bool = False):
    """A `distributed.Client` of the scheduler at `address` within `timeout` seconds, or one line
    saying why not (`probe_scheduler` first: a port that is not a scheduler's is never waited on)."""
    from distributed import Client

    probe_scheduler(address, timeout)
    try:
        return Client(address, timeout=timeout, set_as_default=set_as_default)
    except Exception as exc:  # OSError, TimeoutError; TypeError of tls:// without certificates …
        raise ClusterError(
            f"cannot reach the Dask scheduler at {address} ({SCHEDULER_ENV}): "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no answer'}"
        ) from None


def _worker_states(client) -> list[str]:
    return [w.get("status", "running") for w in client.scheduler_info(n_workers=-1)["workers"].values()]


def no_worker(client, address: str, how_long: str) -> str:
    """Why no worker can take a task: none at all, or all paused or closing (memory?)."""
    try:
        states = _worker_states(client)
    except Exception:  # the scheduler itself is gone: said as no worker
        states = []
    if not states:
        return f"the Dask scheduler at {address} has no worker ({how_long})"
    counts = ", ".join(f"{states.count(state)} {state}" for state in sorted(set(states)))
    return (
        f"the Dask scheduler at {address} has no running worker ({how_long}; {counts}): a "
        "paused worker is over its memory limit: give the workers more memory, or lower "
        "lookup.batch_size; see the workers' logs"
    )


class WorkerWatch:
    """Whether a cluster has been left without a running worker for `timeout` seconds, asked
    every `POLL_S` while a driver waits on its tasks (the CLI's blocks, a Dagster run's steps)."""

    def __init__(self, client, timeout: float) -> None:
        self.client, self.timeout = client, timeout
        self._since: float | None = None

    def lost(self, progressed: bool = False) -> bool:
        if progressed or "running" in _worker_states(self.client):
            self._since = None
        elif self._since is None:
            self._since = time.monotonic()
        return self._since is not None and time.monotonic() - self._since > self.timeout


class DaskSearch:
    """A connection to an existing Dask scheduler that searches query blocks on its workers.

    Connecting checks that the scheduler answers, that it has workers and that they run this
    code; each `search` re-reads the workers (they may come and go) and plans its blocks.
    """

    def __init__(self, address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
        self.address = address
        self.version = code_version()
        self.plans: dict[str, BlockPlan] = {}  # by label (partition), for reports and tests
        self.timeout = timeout
        self.client = connect(address, timeout)
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
            raise ClusterError(no_worker(self.client, self.address, f"waited {timeout:.0f} s")) from None
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
                int((info[address].get("metrics") or {}).get("memory") or 0),
            )
            for address in sorted(facts)
            if address in info
        ]

    def _result(self, future, label: str):
        """`future.result()`, polled: a cluster left without any running worker for `timeout`
        seconds (the only worker killed, or every worker paused) is an error, not a wait forever."""
        watch = WorkerWatch(self.client, self.timeout)
        while True:
            try:
                return future.result(timeout=POLL_S)
            except TimeoutError:
                pass
            if watch.lost():
                how_long = f"for {self.timeout:.0f} s during {label}; nothing was written"
                raise ClusterError(no_worker(self.client, self.address, how_long))

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
                for offset, found in enumerate(self._result(future, label)):
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
