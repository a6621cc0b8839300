"""A real local Dask cluster for tests: `dask scheduler` and `dask worker` processes of the venv.

Every process is started here and ended by its process id (with the worker processes its
nannies spawned), never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from fantasia_assets_tests.conftest import PROJECT

DASK = Path(sys.executable).parent / "dask"


@dataclass
class LocalCluster:
    address: str
    processes: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def client(self):
        from distributed import Client

        return Client(self.address, timeout=30, set_as_default=False)

    def worker_pids(self) -> dict[str, int]:
        """Worker address → pid of the worker process (not its nanny)."""
        with self.client() as client:
            return client.run(os.getpid)

    def stop(self) -> None:
        """End every process started, and their children, by process id."""
        tree = []
        for process in reversed(self.processes):
            with contextlib.suppress(psutil.NoSuchProcess):
                tree += [*psutil.Process(process.pid).children(recursive=True)]
        for process in reversed(self.processes):
            if process.poll() is None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for process in reversed(self.processes):
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        for child in tree:
            if child.is_running():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGKILL)

    def log_text(self) -> str:
        return "\n".join(path.read_text(errors="replace")[-4000:] for path in self.logs if path.exists())


def start_cluster(
    folder: Path,
    n_workers: int = 2,
    memory_limit: str | int = "2GiB",
    env: dict[str, str] | None = None,
    resources: str | None = None,
    nanny: bool = True,
) -> LocalCluster:
    """A scheduler on a free port and `n_workers` single-thread workers, ready to use."""
    folder.mkdir(parents=True, exist_ok=True)
    scheduler_file = folder / "scheduler.json"
    environment = {**os.environ, "PYTHONPATH": str(PROJECT), **(env or {})}
    cluster = LocalCluster("")
    scheduler_log = folder / "scheduler.log"
    with open(scheduler_log, "wb") as log:
        cluster.processes.append(
            subprocess.Popen(
                [
                    str(DASK),
                    "scheduler",
                    "--port",
                    "0",
                    "--no-dashboard",
                    "--scheduler-file",
                    str(scheduler_file),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment,
                cwd=folder,
            )
        )
    cluster.logs.append(scheduler_log)
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists():
            if time.monotonic() > deadline or cluster.processes[0].poll() is not None:
                raise RuntimeError(f"the Dask scheduler did not start:\n{cluster.log_text()}")
            time.sleep(0.1)
        while True:
            try:
                cluster.address = json.loads(scheduler_file.read_text())["address"]
                break
            except (json.JSONDecodeError, KeyError):
                time.sleep(0.1)
        worker_log = folder / "workers.log"
        command = [
            str(DASK), "worker", "--scheduler-file", str(scheduler_file), "--nworkers", str(n_workers),
            "--nthreads", "1", "--memory-limit", str(memory_limit), "--no-dashboard",
        ]  # fmt: skip
        if resources:
            command += ["--resources", resources]
        if not nanny:  # a killed worker stays dead: nobody restarts it
            command.append("--no-nanny")
        with open(worker_log, "wb") as log:
            cluster.processes.append(
                subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environment, cwd=folder)
            )
        cluster.logs.append(worker_log)
        with cluster.client() as client:
            client.wait_for_workers(n_workers, timeout=90)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def loaded_sample_database(pg_server):
    """A database with the bundled sample loaded (its URL, yielded), dropped afterwards: the body
    of the Dask test modules' module-scoped fixtures."""
    import uuid

    import sqlalchemy as sa

    from fantasia_assets.db import get_engine, schema_ready
    from fantasia_assets.db.engine import dispose_engines, normalise_url
    from fantasia_assets.sample import load_sample

    base = normalise_url(pg_server.get_uri())
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    url = base.set(database=name).render_as_string(hide_password=False)
    engine = get_engine(url)
    schema_ready(engine)
    load_sample(engine)
    yield url
    dispose_engines()
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()
