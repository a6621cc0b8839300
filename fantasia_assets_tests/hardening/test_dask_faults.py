"""The Dask path as users break it: the only worker killed mid-search, a scheduler address that is
another kind of server, timeouts that are not a number of seconds, a Dagster job whose steps ask
for a worker resource no worker offers. Each is one line (or a failed run) within the timeout,
never a wait without end or a traceback."""

from __future__ import annotations

import http.server
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from fantasia_assets_tests.conftest import PROJECT
from fantasia_assets_tests.dask_cluster import loaded_sample_database, start_cluster
from fantasia_assets_tests.hardening.helpers import config_dict, write_config
from fantasia_assets_tests.test_distributed_cluster import _HoldFirstBlock


@pytest.fixture(scope="module")
def sample_database(pg_server):
    yield from loaded_sample_database(pg_server)


def _lookup(tmp_path: Path, database: str, **env: str) -> subprocess.Popen:
    config = write_config(tmp_path / "config.yaml", config_dict(tmp_path / "out", **{"lookup.batch_size": 4}))
    environment = {**os.environ, "PYTHONPATH": str(PROJECT), "FANTASIA_DATABASE_URL": database, **env}
    return subprocess.Popen(
        [sys.executable, "-m", "fantasia_assets.cli", "lookup", "--config", str(config)],
        env=environment, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _wait_for_the_held_block(marker: Path, running: subprocess.Popen) -> None:
    """Until a worker holds the lookup's first search block (`_HoldFirstBlock` wrote its pid)."""
    deadline = time.monotonic() + 240
    while not marker.exists() or not marker.read_text():
        assert running.poll() is None, running.communicate()
        assert time.monotonic() < deadline, "no search block started"
        time.sleep(0.05)


def _error_lines(stderr: str) -> list[str]:
    """stderr without the progress lines a cold reference fetch may print."""
    return [
        line for line in stderr.strip().splitlines() if not line.startswith(("fetch references:", "search "))
    ]


def test_the_only_worker_killed_while_a_lookup_waits_on_it__error_line_within_the_timeout(
    tmp_path, sample_database
):
    cluster = start_cluster(tmp_path / "cluster", n_workers=1, nanny=False)
    marker = tmp_path / "worker.pid"
    try:
        with cluster.client() as client:
            client.register_plugin(_HoldFirstBlock(str(marker)))
        running = _lookup(
            tmp_path, sample_database, FANTASIA_DASK_SCHEDULER=cluster.address, FANTASIA_DASK_TIMEOUT="3"
        )
        _wait_for_the_held_block(marker, running)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        killed = time.monotonic()
        _, stderr = running.communicate(timeout=120)
        waited = time.monotonic() - killed
    finally:
        cluster.stop()
    assert running.returncode == 2, stderr
    [line] = _error_lines(stderr)
    assert line.startswith(f"error: the Dask scheduler at {cluster.address} has no worker (for 3 s during ")
    assert waited < 60
    assert not (tmp_path / "out" / "summary.csv").exists()


def test_ctrl_c_while_a_lookup_waits_on_the_cluster__interrupted_line_and_exit_130_at_once(
    tmp_path, sample_database
):
    cluster = start_cluster(tmp_path / "cluster", n_workers=1)
    marker = tmp_path / "worker.pid"
    try:
        with cluster.client() as client:
            client.register_plugin(_HoldFirstBlock(str(marker)))  # the block is held for 120 s
        running = _lookup(tmp_path, sample_database, FANTASIA_DASK_SCHEDULER=cluster.address)
        _wait_for_the_held_block(marker, running)
        running.send_signal(signal.SIGINT)
        interrupted = time.monotonic()
        _, stderr = running.communicate(timeout=120)
        waited = time.monotonic() - interrupted
    finally:
        cluster.stop()
    assert running.returncode == 130, stderr
    assert _error_lines(stderr)[-1].startswith("error: interrupted: ")
    assert waited < 30  # not the 120 s the worker holds the block
    assert not (tmp_path / "out" / "summary.csv").exists()


def test_scheduler_address_of_an_http_server__error_line_within_the_timeout(tmp_path, sample_database):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    address = f"tcp://127.0.0.1:{server.server_address[1]}"
    try:
        started = time.monotonic()
        running = _lookup(
            tmp_path, sample_database, FANTASIA_DASK_SCHEDULER=address, FANTASIA_DASK_TIMEOUT="2"
        )
        _, stderr = running.communicate(timeout=120)
        waited = time.monotonic() - started
    finally:
        server.shutdown()
    assert running.returncode == 2, stderr
    [line] = _error_lines(stderr)
    assert line == (
        f"error: {address} (FANTASIA_DASK_SCHEDULER) accepts connections but does not answer as a Dask "
        "scheduler: is it another port of the scheduler's host, such as its dashboard (8787) instead of "
        "the scheduler (8786)?"
    )
    assert waited < 60


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "1e400", "abc"])
def test_dask_timeout_that_is_not_a_positive_number_of_seconds__error_line_naming_it(
    tmp_path, sample_database, value
):
    running = _lookup(
        tmp_path, sample_database, FANTASIA_DASK_SCHEDULER="tcp://127.0.0.1:1", FANTASIA_DASK_TIMEOUT=value
    )
    _, stderr = running.communicate(timeout=120)
    assert running.returncode == 2, stderr
    assert _error_lines(stderr) == [
        f"error: FANTASIA_DASK_TIMEOUT={value!r}: give a number of seconds above 0 (at most a day)"
    ]


@pytest.mark.parametrize("scheme", ["tls", "ucx"])
def test_scheduler_address_of_a_protocol_without_its_setup__error_line_not_a_traceback(
    tmp_path, sample_database, scheme
):
    running = _lookup(
        tmp_path,
        sample_database,
        FANTASIA_DASK_SCHEDULER=f"{scheme}://127.0.0.1:1",
        FANTASIA_DASK_TIMEOUT="2",
    )
    _, stderr = running.communicate(timeout=120)
    assert running.returncode == 2, stderr
    [line] = _error_lines(stderr)
    assert line.startswith(f"error: cannot reach the Dask scheduler at {scheme}://127.0.0.1:1 ")


def partition_dask_job():
    """The job as a worker would reconstruct it (module-level, importable)."""
    from fantasia_assets.definitions import defs

    return defs.resolve_job_def("lookup_partition_dask_job")


def test_dagster_dask_job_when_no_worker_offers_the_gpu_resource__run_fails_at_once_naming_it(
    tmp_path, sample_database, monkeypatch
):
    import importlib

    import dagster as dg

    import fantasia_assets.definitions as definitions
    from fantasia_assets.defs.partitions import MODEL_LAYER

    config = write_config(tmp_path / "config.yaml", config_dict(tmp_path / "out"))
    cluster = start_cluster(tmp_path / "cluster", n_workers=1)  # no --resources GPU=1
    try:
        monkeypatch.setenv("FANTASIA_CONFIG", str(config))
        monkeypatch.setenv("FANTASIA_DATABASE_URL", sample_database)
        monkeypatch.setenv("FANTASIA_DASK_SCHEDULER", cluster.address)
        monkeypatch.setenv("FANTASIA_DASK_TIMEOUT", "5")
        importlib.reload(definitions)  # resources read the environment at import
        with dg.instance_for_test(temp_dir=str(tmp_path)) as instance:
            instance.add_dynamic_partitions(MODEL_LAYER.name, ["NEAR|layer_0"])
            started = time.monotonic()
            result = dg.execute_job(
                dg.reconstructable(partition_dask_job),
                instance,
                tags={"dagster/partition": "NEAR|layer_0"},
                raise_on_error=False,
            )
            waited = time.monotonic() - started
    finally:
        cluster.stop()
    assert not result.success
    # the run's failure carries the executor's error (what the UI shows under the failed run)
    failures = " ".join(
        f"{event.message} {getattr(getattr(event.event_specific_data, 'error', None), 'message', '')}"
        for event in result.all_events
        if event.is_failure or event.event_type_value == "PIPELINE_FAILURE"
    )
    assert "asks for the Dask worker resource GPU=1, which no worker" in failures
    assert "start the workers that should run it with `--resources GPU=1`" in failures
    assert waited < 120
    assert not (tmp_path / "out" / "raw_results").exists()
