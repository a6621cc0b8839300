"""The reference database goes away before or during a lookup: a clear error, then a clean re-run.

Each test uses a private embedded server (its own data directory under a temporary folder, like
`db/test_embedded.py`) with the bundled sample loaded, kills its postmaster with SIGKILL (a crash:
no clean shutdown, crash recovery on restart), runs `fantasia-assets lookup` against it through
`cli.main`, restarts it in place and runs again. The outputs of the re-run are compared byte for
byte with an undisturbed run of the same configuration into another experiment_path.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import polars as pl
import psutil
import pytest
import yaml

from fantasia_assets import progress as progress_module
from fantasia_assets.cli import main
from fantasia_assets.config import parse_config
from fantasia_assets.db import get_engine, schema_ready
from fantasia_assets.db.embedded import embedded_server
from fantasia_assets.db.engine import dispose_engines, normalise_url, redacted
from fantasia_assets.runner import run_lookup
from fantasia_assets.sample import SAMPLE_DIR, load_sample
from fantasia_assets_tests.conftest import PROJECT
from fantasia_assets_tests.hardening.helpers import tree


def _config(experiment: Path) -> dict:
    raw = yaml.safe_load((PROJECT / "data" / "config.yaml").read_text())
    raw["experiment_path"] = str(experiment)
    raw["embeddings_path"] = str(SAMPLE_DIR / "queries.h5")
    return raw


def _config_file(tmp_path: Path, experiment: Path) -> Path:
    path = tmp_path / f"{experiment.name}.yaml"
    path.write_text(yaml.safe_dump(_config(experiment), sort_keys=False))
    return path


def _leftover_temporary_files(*roots: Path) -> list[Path]:
    return [p for root in roots for p in root.rglob(".*.tmp")]


def _kill(server) -> None:
    """Crash the server: SIGKILL to the postmaster, then wait until every backend is gone too."""
    postmaster = psutil.Process(server.get_pid())
    children = postmaster.children(recursive=True)
    postmaster.kill()
    _, alive = psutil.wait_procs([postmaster, *children], timeout=30)
    assert not alive, f"server processes still alive after SIGKILL: {alive}"


def _restart(server) -> None:
    """Start the killed server again in place (same data directory, same socket, same URL).

    What `PostgresServer.start()` does, less registering this process a second time; as root,
    `ensure_pgdata_inited` also lets the `pgserver` user traverse to the data directory again.
    """
    with server._lock:
        server.ensure_pgdata_inited()
        server.ensure_postgres_running()


@pytest.fixture(scope="module")
def private_server(fantasia_home):
    """(server, url): a private embedded server with the sample loaded in its `postgres` database.

    Not under pytest's tmp_path: run as root, the server runs as user `pgserver`, and every pytest
    session that starts meanwhile resets /tmp/pytest-of-root to mode 0700, so a restart there fails.
    """
    folder = Path(tempfile.mkdtemp(prefix="fa-db-faults-"))
    server = embedded_server(folder / "pg")
    url = normalise_url(server.get_uri()).set(database="postgres")
    try:
        engine = get_engine(url)
        schema_ready(engine)
        load_sample(engine)
        yield server, url
    finally:
        dispose_engines()
        server.cleanup()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def undisturbed(private_server, tmp_path_factory) -> dict[str, str]:
    """File digests of a lookup that nothing disturbed, on the same reference database."""
    _, url = private_server
    experiment = tmp_path_factory.mktemp("undisturbed") / "experiment"
    run_lookup(parse_config(_config(experiment)), get_engine(url))
    return tree(experiment)


@pytest.fixture()
def server_url(private_server, monkeypatch):
    """FANTASIA_DATABASE_URL points at the private server; it runs again after the test whatever happened."""
    server, url = private_server
    monkeypatch.setenv("FANTASIA_DATABASE_URL", url.render_as_string(hide_password=False))
    yield server, url
    if not server.get_postmaster_info().is_running():
        _restart(server)


def _assert_unreachable_error(err: str, url) -> None:
    assert err.count("\n") == 1 and err.startswith("error: "), err  # one line, nothing else
    assert "Traceback" not in err
    assert "cannot reach the reference database" in err
    assert redacted(url) in err
    assert "run the command again" in err


def test_database_stopped_before_the_lookup__clear_error_and_retry_succeeds(
    server_url, undisturbed, tmp_path, capsys
):
    server, url = server_url
    experiment = tmp_path / "experiment"
    config = _config_file(tmp_path, experiment)
    _kill(server)

    assert main(["lookup", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    _assert_unreachable_error(captured.err, url)

    _restart(server)
    # the engine cached for this URL keeps its dead connections: pool_pre_ping replaces them
    assert main(["lookup", "--config", str(config)]) == 0
    assert tree(experiment) == undisturbed
    assert not _leftover_temporary_files(experiment)


@pytest.mark.parametrize("nth", [1, 3], ids=["first_partition", "third_partition"])
def test_database_stopped_during_a_partition__clear_error_and_rerun_is_identical(
    server_url, undisturbed, fantasia_home, tmp_path, capsys, monkeypatch, nth
):
    """Killed once the nth partition's reference matrix is in memory and its search has begun.

    The later stages still need the database (reference sequences for the raw rows, the next
    partition's fingerprint), so the run fails; it is all or nothing, so the partitions before
    the nth, computed already, are not published either.
    """
    server, url = server_url
    experiment = tmp_path / "experiment"
    config = _config_file(tmp_path, experiment)
    searched: list[str] = []
    real_terminal_progress = progress_module.terminal_progress

    def killing_terminal_progress(*args, **kwargs):
        inner = real_terminal_progress(*args, **kwargs)

        def progress(stage: str, done: int, total: int) -> None:
            if stage.startswith("search") and stage not in searched:
                searched.append(stage)
                if len(searched) == nth:
                    _kill(server)
            inner(stage, done, total)

        progress.end_line = getattr(inner, "end_line", lambda: None)
        return progress

    monkeypatch.setattr(progress_module, "terminal_progress", killing_terminal_progress)
    assert main(["lookup", "--config", str(config)]) == 2
    captured = capsys.readouterr()
    assert len(searched) == nth  # the server died in the nth partition, not before
    error_lines = [line for line in captured.err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1 and captured.err.endswith(error_lines[0] + "\n"), captured.err
    _assert_unreachable_error(error_lines[0] + "\n", url)
    # nothing of the failed run is published: no partition, no run-wide output, no staging left
    assert tree(experiment) == {}

    _restart(server)
    monkeypatch.setattr(progress_module, "terminal_progress", real_terminal_progress)
    assert main(["lookup", "--config", str(config)]) == 0
    assert tree(experiment) == undisturbed
    assert not _leftover_temporary_files(experiment, fantasia_home / "cache")
    shards = list((experiment / "raw_results").rglob("*.csv"))
    assert len(shards) == 4 * 50  # four partitions × 50 query accessions
    for shard in shards:
        assert not pl.read_csv(shard).is_duplicated().any(), shard


def test_lookup_against_a_database_never_loaded__error_says_to_load_references_first(
    database_url, tmp_path, capsys
):
    experiment = tmp_path / "experiment"
    assert main(["lookup", "--config", str(_config_file(tmp_path, experiment))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the reference database has no reference set yet")
    assert "load-references" in err and "Traceback" not in err
    assert not experiment.exists()
