"""The lookup on a real local Dask cluster (`dask scheduler` + `dask worker` of the venv).

One sample database and two clusters for the module: two roomy workers (declaring the `GPU`
resource `neighbour_hits` asks for), and one worker whose memory limit is just enough for
blocks of one batch (its memory monitor off, so the limit is only what the scheduler reports
and the block plan reads). Every output is compared byte for byte with the in-process run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest
import yaml
from distributed.diagnostics.plugin import WorkerPlugin

from fantasia_assets_tests.conftest import PROJECT, SAMPLE
from fantasia_assets_tests.dask_cluster import loaded_sample_database, start_cluster
from fantasia_assets_tests.hardening.helpers import tree

BATCH = 8  # 50 sample queries: several batches and blocks per partition
PARTITIONS = ["NEAR|layer_0", "AntiBERTy|layer_3"]


@pytest.fixture(scope="module")
def sample_database(pg_server):
    """A database with the bundled sample loaded, for the whole module."""
    yield from loaded_sample_database(pg_server)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dask")


def _config(folder: Path, name: str, batch: int = BATCH) -> Path:
    raw = yaml.safe_load((PROJECT / "data" / "config.yaml").read_text())
    raw["experiment_path"] = str(folder / name)
    raw["embeddings_path"] = str(SAMPLE / "queries.h5")
    raw["batch_size"] = raw["lookup"]["batch_size"] = batch
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _environment(sample_database: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "FANTASIA_DATABASE_URL": sample_database, **extra}
    if "FANTASIA_DASK_SCHEDULER" not in extra:
        env.pop("FANTASIA_DASK_SCHEDULER", None)
    return env


def _lookup(config: Path, env: dict[str, str], wait: bool = True):
    command = [sys.executable, "-m", "fantasia_assets.cli", "lookup", "--config", str(config)]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def in_process(folder, sample_database) -> dict[str, bytes]:
    """The outputs of the plain in-process CLI lookup."""
    done = _lookup(_config(folder, "in_process"), _environment(sample_database))
    assert done.returncode == 0, done.stderr
    return tree(folder / "in_process")


@pytest.fixture(scope="module")
def cluster(folder, sample_database, fantasia_home):
    dagster_config = _config(folder, "dagster")
    env = {
        "FANTASIA_DATABASE_URL": sample_database,
        "FANTASIA_CONFIG": str(dagster_config),
        "FANTASIA_HOME": str(fantasia_home),
    }
    running = start_cluster(folder / "cluster", n_workers=2, memory_limit="2GiB", env=env, resources="GPU=1")
    yield running
    running.stop()


def test_cli_lookup_on_the_cluster_is_identical(cluster, folder, sample_database, in_process):
    config = _config(folder, "on_cluster")
    done = _lookup(config, _environment(sample_database, FANTASIA_DASK_SCHEDULER=cluster.address))
    assert done.returncode == 0, done.stderr + cluster.log_text()
    assert f"search on the Dask cluster at {cluster.address}" in done.stdout
    assert tree(folder / "on_cluster") == in_process
    # the workers built engines on the matrix and kept them for later blocks
    with cluster.client() as client:
        kept = client.run(_engines_kept)
    assert sum(kept.values()) >= 1


def _engines_kept() -> int:
    from fantasia_assets.core import distributed

    return len(distributed._engines)


class _HoldFirstBlock(WorkerPlugin):
    """Writes the pid of the worker that starts the first search block and holds it there."""

    name = "fantasia-test-hold-first-block"

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def transition(self, key, start, finish, **kwargs) -> None:
        if finish != "executing" or not str(key).startswith("fantasia-search-"):
            return
        try:
            handle = os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        os.write(handle, str(os.getpid()).encode())
        os.close(handle)
        time.sleep(120)  # until the test kills this process


def test_worker_killed_mid_run_has_its_block_retried_elsewhere(cluster, folder, sample_database, in_process):
    marker = folder / "killed-worker.pid"
    with cluster.client() as client:
        client.register_plugin(_HoldFirstBlock(str(marker)))
        try:
            pids = set(cluster.worker_pids().values())
            config = _config(folder, "killed")
            running = _lookup(
                config, _environment(sample_database, FANTASIA_DASK_SCHEDULER=cluster.address), False
            )
            deadline = time.monotonic() + 240
            while not marker.exists() or not marker.read_text():
                assert running.poll() is None, running.communicate()
                assert time.monotonic() < deadline, "no search block started"
                time.sleep(0.05)
            victim = int(marker.read_text())
            assert victim in pids
            os.kill(victim, signal.SIGKILL)
            _, stderr = running.communicate(timeout=300)
        finally:
            client.unregister_worker_plugin(_HoldFirstBlock.name)
    assert running.returncode == 0, stderr + cluster.log_text()
    with pytest.raises(ProcessLookupError):
        os.kill(victim, 0)
    assert tree(folder / "killed") == in_process


def test_unreachable_scheduler_is_one_line_and_nothing_is_written(folder, sample_database):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    config = _config(folder, "unreachable")
    env = _environment(
        sample_database, FANTASIA_DASK_SCHEDULER=f"tcp://127.0.0.1:{port}", FANTASIA_DASK_TIMEOUT="2"
    )
    done = _lookup(config, env)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: cannot reach the Dask scheduler at tcp://127.0.0.1:{port}")
    assert not (folder / "unreachable").exists()


def test_workers_of_other_code_are_refused(cluster, monkeypatch):
    from fantasia_assets.core import distributed

    monkeypatch.setattr(distributed, "_code_version", "0.0.0+0123456789abcdef")
    with pytest.raises(distributed.ClusterError) as refused:
        distributed.DaskSearch(cluster.address)
    message = str(refused.value)
    assert "Dask workers run other code than this process (0.0.0+0123456789abcdef)" in message
    for address in cluster.worker_pids():
        assert address in message


# ---------------------------------------------------------------------------------------------
# Dagster: the partition job with dagster-dask's executor


def dask_partition_job():
    """The job as workers reconstruct it (module-level, importable)."""
    from fantasia_assets.definitions import defs

    return defs.resolve_job_def("lookup_partition_dask_job")


def test_dagster_partitions_on_the_dask_executor_are_identical(
    cluster, folder, sample_database, in_process, monkeypatch, tmp_path
):
    """Two partitions of the partition job, every step a task on the cluster: the partitions'
    files are those of the in-process CLI run (same configuration but for experiment_path)."""
    import importlib

    import dagster as dg

    import fantasia_assets.definitions as definitions
    from fantasia_assets.defs.partitions import MODEL_LAYER

    monkeypatch.setenv("FANTASIA_CONFIG", str(folder / "dagster.yaml"))
    monkeypatch.setenv("FANTASIA_DATABASE_URL", sample_database)
    monkeypatch.setenv("FANTASIA_DASK_SCHEDULER", cluster.address)
    importlib.reload(definitions)  # resources read the environment at import
    with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
        instance.add_dynamic_partitions(MODEL_LAYER.name, PARTITIONS)
        for key in PARTITIONS:
            result = dg.execute_job(
                dg.reconstructable(dask_partition_job), instance, tags={"dagster/partition": key}
            )
            failures = [event.message for event in result.all_events if event.is_failure]
            assert result.success, failures
            steps = {event.step_key for event in result.all_events if event.is_step_success}
            assert {"neighbour_hits", "raw_result_shards", "topgo_exports"} <= steps
    written = tree(folder / "dagster")
    folders = [
        Path(kind) / model / layer
        for kind in ("raw_results", "parquet", "topgo")
        for model, layer in (p.split("|") for p in PARTITIONS)
    ]
    expected = {
        name: data for name, data in in_process.items() if any(Path(name).is_relative_to(f) for f in folders)
    }
    assert expected and {name: data for name, data in written.items() if name in expected} == expected
    assert set(expected) <= set(written)


def _accessions() -> list[str]:
    with h5py.File(SAMPLE / "queries.h5") as handle:
        return sorted(k[len("accession_") :] for k in handle)


# ---------------------------------------------------------------------------------------------
# a worker with little memory


def _largest_reference_matrix() -> tuple[int, int]:
    """(references, dimensions) of the sample's largest matrix (AntiBERTy: 300 × 512)."""
    shapes = []
    for name in ("references_near.h5", "references_antiberty.h5"):
        with h5py.File(SAMPLE / name) as handle:
            first = handle[next(iter(handle))]
            model = next(key for key in first if key.startswith("type_"))
            layer = next(iter(first[model]))
            shapes.append((len(handle), first[model][layer]["embedding"].shape[0]))
    return max(shapes, key=lambda shape: shape[0] * shape[1])


@pytest.fixture(scope="module")
def small_cluster(folder):
    """One worker whose memory limit fits the largest partition's matrix and blocks of one batch.

    Dask's memory monitor is off, so the worker runs although the limit is below what the
    interpreter itself uses: the limit is only what the scheduler reports to the block plan.
    """
    from fantasia_assets.core.distributed import minimum_memory_limit

    limit = minimum_memory_limit(*_largest_reference_matrix(), BATCH)
    env = {
        f"DASK_DISTRIBUTED__WORKER__MEMORY__{key}": "False"
        for key in ("TARGET", "SPILL", "PAUSE", "TERMINATE")
    }
    running = start_cluster(folder / "small_cluster", n_workers=1, memory_limit=limit, env=env)
    yield running
    running.stop()


def test_blocks_are_resized_to_a_small_worker_and_identical(
    small_cluster, folder, sample_database, in_process
):
    config = _config(folder, "small")
    done = _lookup(config, _environment(sample_database, FANTASIA_DASK_SCHEDULER=small_cluster.address))
    assert done.returncode == 0, done.stderr + small_cluster.log_text()
    # 50 queries: AntiBERTy's blocks cut to one batch to fit; NEAR's (half the width) twice that
    assert "AntiBERTy|layer_3: 7 blocks of ≤ 8 queries" in done.stdout
    assert "NEAR|layer_0: 4 blocks of ≤ 16 queries" in done.stdout
    assert tree(folder / "small") == in_process


def test_a_batch_too_large_for_the_worker_is_refused_clearly(small_cluster, folder, sample_database):
    config = _config(folder, "too_large", batch=516)
    done = _lookup(config, _environment(sample_database, FANTASIA_DASK_SCHEDULER=small_cluster.address))
    assert done.returncode == 2
    # one line says what went wrong (progress lines of a cold reference fetch may precede it)
    lines = [line for line in done.stderr.strip().splitlines() if not line.startswith("fetch references:")]
    assert len(lines) == 1, done.stderr
    assert "error: one search batch of 50 queries of" in lines[0]
    assert "lower lookup.batch_size" in lines[0]
    assert not (folder / "too_large" / "summary.csv").exists()
    assert not (folder / "too_large" / "raw_results").exists()
