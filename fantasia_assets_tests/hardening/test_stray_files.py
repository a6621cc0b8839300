"""Files left where they do not belong: scratch files of a killed process (under $FANTASIA_HOME,
never the system's temporary folder, removed when the next command starts), and the folders of
partitions a rerun no longer has."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from fantasia_assets import cli
from fantasia_assets.core.stale import stale_partition_dirs
from fantasia_assets.paths import clear_stale_temporaries, temporary_file
from fantasia_assets_tests.conftest import PROJECT, SAMPLE
from fantasia_assets_tests.hardening.helpers import config_dict, near_only, write_config

_PARSE_OBO = "from fantasia_assets.db.sources import read_obo; import sys; read_obo(sys.argv[1])"


def test_sigkill_during_obo_parsing__scratch_file_under_fantasia_home_removed_at_next_start(
    tmp_path, monkeypatch, capsys
):
    home, system_tmp = tmp_path / "home", tmp_path / "system-tmp"
    system_tmp.mkdir()
    env = {**os.environ, "FANTASIA_HOME": str(home), "TMPDIR": str(system_tmp), "PYTHONPATH": str(PROJECT)}
    child = subprocess.Popen([sys.executable, "-c", _PARSE_OBO, str(SAMPLE / "go-basic.obo.gz")], env=env)
    scratch = home / "tmp"
    deadline = time.monotonic() + 60
    try:
        # the decompressed copy is complete once goatools has started reading it: kill then
        while time.monotonic() < deadline and child.poll() is None:
            found = list(scratch.glob("*.obo")) if scratch.is_dir() else []
            if found and found[0].stat().st_size > 3_000_000:
                break
            time.sleep(0.01)
        assert child.poll() is None, "read_obo finished before it could be killed"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    [left] = list(scratch.iterdir())
    assert left.name.split("~")[1] == str(child.pid)
    assert list(system_tmp.iterdir()) == []

    # the next command, whatever it is, clears it before its own work (here: a config that is missing)
    monkeypatch.setenv("FANTASIA_HOME", str(home))
    assert cli.main(["lookup", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "error: " in capsys.readouterr().err
    assert list(scratch.iterdir()) == []


def test_scratch_files_of_live_processes__kept_by_the_next_start(tmp_path, monkeypatch):
    monkeypatch.setenv("FANTASIA_HOME", str(tmp_path))
    with temporary_file(".obo") as mine:
        mine.write_text("in use")
        other = mine.with_name(mine.name.replace(f"~{os.getpid()}~", f"~{os.getppid()}~"))
        other.write_text("in use by the parent process")
        foreign = mine.with_name("someone-else's.file")
        foreign.write_text("not ours")
        assert clear_stale_temporaries() == []
        assert mine.exists() and other.exists() and foreign.exists()
    assert not mine.exists()


def test_rerun_with_fewer_layers__old_layer_folders_removed_and_named(sample_loaded, tmp_path, capsys):
    experiment = tmp_path / "experiment"
    first = write_config(tmp_path / "first.yaml", config_dict(experiment, **near_only([0, 1])))
    assert cli.main(["lookup", "--config", str(first)]) == 0
    layer_1 = [experiment / root / "NEAR" / "layer_1" for root in ("raw_results", "topgo", "parquet")]
    assert all(folder.is_dir() for folder in layer_1)
    (experiment / "notes").mkdir()  # not ours: never touched
    capsys.readouterr()
    second = write_config(tmp_path / "second.yaml", config_dict(experiment, **near_only([0])))
    assert cli.main(["lookup", "--config", str(second)]) == 0
    out = capsys.readouterr().out
    assert not any(folder.exists() for folder in layer_1)
    for root in ("raw_results", "topgo", "parquet"):
        assert f"removed, not part of this run any more: {root}/NEAR/layer_1" in out
        assert (experiment / root / "NEAR" / "layer_0").is_dir()
    assert (experiment / "topgo" / "ensemble").is_dir() and (experiment / "notes").is_dir()
    assert stale_partition_dirs(experiment, [Path("NEAR/layer_0")]) == []


def test_rerun_with_topgo_turned_off__the_earlier_topgo_files_removed_and_named(
    sample_loaded, tmp_path, capsys
):
    experiment = tmp_path / "experiment"
    first = write_config(tmp_path / "first.yaml", config_dict(experiment, **near_only([0])))
    assert cli.main(["lookup", "--config", str(first)]) == 0
    assert (experiment / "topgo" / "NEAR" / "layer_0").is_dir() and (
        experiment / "topgo" / "ensemble"
    ).is_dir()
    capsys.readouterr()
    off = write_config(
        tmp_path / "off.yaml", config_dict(experiment, **near_only([0]), **{"lookup.topgo": False})
    )
    assert cli.main(["lookup", "--config", str(off)]) == 0
    assert "removed, not part of this run any more: topgo" in capsys.readouterr().out
    assert not (experiment / "topgo").exists()  # as a fresh run with TopGO off leaves it
    assert cli.main(["lookup", "--config", str(first)]) == 0  # on again: written whole
    assert sorted(p.name for p in (experiment / "topgo" / "ensemble").iterdir()) == [
        "C.topgo",
        "F.topgo",
        "P.topgo",
    ]


def test_lookup_with_predictions_then_evaluate__scratch_folders_under_fantasia_home_never_the_system_ones(
    sample_loaded, tmp_path, monkeypatch, capsys
):
    import socket
    import tempfile

    home = tmp_path / "home"
    monkeypatch.setenv("FANTASIA_HOME", str(home))
    made = []
    mkdtemp = tempfile.mkdtemp

    def recording(suffix=None, prefix=None, dir=None):
        path = mkdtemp(suffix, prefix, dir)
        made.append(Path(path))
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", recording)
    config = write_config(tmp_path / "config.yaml", config_dict(tmp_path / "out", **near_only([0])))
    assert cli.main(["lookup", "--config", str(config)]) == 0  # predictions.tsv: the GO graph decompressed
    assert (tmp_path / "out" / "predictions.tsv").exists()
    truth = str(SAMPLE / "queries_truth.gaf.gz")
    assert cli.main(["evaluate", "--config", str(config), "--truth", truth]) == 0  # the evaluator's inputs
    capsys.readouterr()

    def kind(path: Path) -> str:
        return path.name.split("~")[-1].split("-")[0]

    assert {"obo", "eval"} <= {kind(path) for path in made if path.parent == home / "tmp"}
    assert not [p for p in made if p.name.startswith(("fa-obo-", "fa-eval-"))]  # the system's, before
    ours = [p for p in made if kind(p) in ("obo", "eval")]
    assert all(p.parent == home / "tmp" for p in ours), ours
    assert all(p.name.startswith(f"{socket.gethostname()}~{os.getpid()}~") for p in ours)
    assert list((home / "tmp").iterdir()) == []  # each removed when its work ended
