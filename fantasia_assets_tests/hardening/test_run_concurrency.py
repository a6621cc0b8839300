"""Commands that run at the same time: a fresh home, one experiment_path, a load during a lookup.

The fresh-home case starts real `fantasia-assets` subprocesses on an empty `FANTASIA_HOME`
(its own embedded server); the others use the session's server and real threads.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import polars as pl
import sqlalchemy as sa

from fantasia_assets import runner
from fantasia_assets.config import parse_config
from fantasia_assets.core.locks import experiment_lock
from fantasia_assets.db.loader import load_references
from fantasia_assets.runner import run_lookup
from fantasia_assets.sample import SAMPLE_DIR
from fantasia_assets_tests.conftest import PROJECT
from fantasia_assets_tests.hardening.helpers import (
    config_dict,
    hidden,
    near_only,
    sample_groups,
    tree,
    write_queries,
)

TIMEOUT = 240  # seconds for a first start (initdb) on a loaded machine


def _cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "FANTASIA_DATABASE_URL"}
    env["FANTASIA_HOME"] = str(home)
    env["PYTHONPATH"] = str(PROJECT)
    return env


def test_two_commands_at_once_on_a_fresh_home__both_succeed_on_one_server(tmp_path):
    env = _cli_env(tmp_path / "home")
    command = [sys.executable, "-m", "fantasia_assets.cli", "db", "current"]
    runs = [
        subprocess.Popen(
            command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [(*run.communicate(timeout=TIMEOUT), run.returncode) for run in runs]
    for out, err, code in results:
        assert code == 0, err
        assert "Traceback" not in err and "IntegrityError" not in err
        assert "revision:" in out


def _waiting_for_lock(engine) -> bool:
    with engine.connect() as conn:
        return bool(
            conn.execute(
                sa.text("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted")
            ).scalar()
        )


def _wait_until(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_load_committing_during_a_lookup__the_lookup_reads_one_reference_set(
    sample_loaded, tmp_path, monkeypatch, caplog
):
    config = parse_config(config_dict(tmp_path / "before", **near_only([0])))
    before = run_lookup(config, sample_loaded)
    done: dict[str, float] = {}

    def load() -> None:  # a real second load, taking the load lock and committing
        load_references(sample_loaded, obo=SAMPLE_DIR / "go-basic.obo.gz")
        done["load"] = time.monotonic()

    loader = threading.Thread(target=load)
    search = runner.search_partition

    def search_while_loading(*args, **kwargs):
        if not loader.is_alive() and "load" not in done:
            loader.start()
            _wait_until(lambda: _waiting_for_lock(sample_loaded))  # the load waits for this lookup
        return search(*args, **kwargs)

    monkeypatch.setattr(runner, "search_partition", search_while_loading)
    config = parse_config(config_dict(tmp_path / "during", **near_only([0])))
    with caplog.at_level(logging.WARNING):
        during = run_lookup(config, sample_loaded)
    finished = time.monotonic()
    loader.join(timeout=120)
    assert done["load"] > finished  # committed only once the lookup had read everything
    assert "or a lookup is reading it" in caplog.text
    assert [p.n_rows for p in during.partitions] == [p.n_rows for p in before.partitions]
    assert tree(tmp_path / "during") == tree(tmp_path / "before")


def test_lookup_started_while_a_load_commits__waits_for_the_commit_and_says_so(
    sample_loaded, tmp_path, caplog
):
    from fantasia_assets.db.load_report import LoadReport
    from fantasia_assets.db.loader import _take_load_lock

    holding, release = threading.Event(), threading.Event()

    def hold_load_lock() -> None:
        with sample_loaded.begin() as conn:
            _take_load_lock(conn.connection.driver_connection.cursor(), LoadReport())
            holding.set()
            release.wait(60)

    holder = threading.Thread(target=hold_load_lock)
    holder.start()
    holding.wait(60)
    timer = threading.Timer(1.0, release.set)
    timer.start()
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        run_lookup(parse_config(config_dict(tmp_path / "out", **near_only([0]))), sample_loaded)
    holder.join(60)
    assert time.monotonic() - started >= 1.0
    assert "the lookup waits for it to commit" in caplog.text


def test_two_lookups_with_different_queries_into_one_experiment_path__one_waits_and_no_mix(
    sample_loaded, tmp_path, caplog
):
    experiment = tmp_path / "experiment"
    few = write_queries(tmp_path / "few.h5", sample_groups(20))
    configs = [
        parse_config(config_dict(experiment, **near_only())),
        parse_config(config_dict(experiment, few, **near_only())),
    ]
    errors: list[BaseException] = []

    def run(config) -> None:
        try:
            run_lookup(config, sample_loaded)
        except BaseException as error:  # reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=run, args=(config,)) for config in configs]
    with caplog.at_level(logging.WARNING), experiment_lock(experiment):
        for thread in threads:  # both start while the folder is taken: both must wait
            thread.start()
        _wait_until(lambda: caplog.text.count("waiting for it to finish") >= 2)
    for thread in threads:
        thread.join(300)
    assert errors == []
    summary = pl.read_csv(experiment / "summary.csv")
    accessions = set(summary[summary.columns[0]].to_list())
    shards = [
        {p.stem for p in (experiment / "raw_results" / "NEAR" / layer).iterdir()}
        for layer in ("layer_0", "layer_1")
    ]
    assert len(shards[0]) in (20, 50)  # whole outputs of one run, never a mix
    assert shards[0] == shards[1]
    assert len(accessions) <= len(shards[0])
    assert hidden(experiment) == []


_HOLDER = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(120)
"""
# a run whose SIGINT the kernel hands to another thread than the main one (torch's, the start-up
# reads'): the main thread blocks the signal, so only the idle thread can receive it
_WAITER = """
import signal, sys, threading, time
from fantasia_assets.core.locks import experiment_lock
threading.Thread(target=time.sleep, args=(120,), daemon=True).start()
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
try:
    with experiment_lock(sys.argv[1], probe=False):
        print("locked", flush=True)
except KeyboardInterrupt:
    print("interrupted", flush=True)
    sys.exit(130)
"""


def test_ctrl_c_while_waiting_for_another_runs_experiment_path__ends_at_once(tmp_path):
    folder = tmp_path / "experiment"
    folder.mkdir()
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        waiter = subprocess.Popen(
            [sys.executable, "-c", _WAITER, str(folder)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            line = waiter.stderr.readline()  # the warning logged as the wait starts
            assert "waiting for it to finish" in line, line
            time.sleep(0.5)
            waiter.send_signal(signal.SIGINT)
            out, _ = waiter.communicate(timeout=20)  # a blocking flock() never returned: a timeout
            assert waiter.returncode == 130 and out.strip() == "interrupted"
        finally:
            waiter.kill()
            waiter.wait()
    finally:
        holder.kill()
        holder.wait()
