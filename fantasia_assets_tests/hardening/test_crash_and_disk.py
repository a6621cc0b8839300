"""A lookup killed mid-write, or a full disk: never a half-written file, and a re-run repairs all."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys

import pytest

from fantasia_assets import cli
from fantasia_assets.config import parse_config
from fantasia_assets.core import exports
from fantasia_assets.runner import run_lookup
from fantasia_assets_tests.conftest import PROJECT
from fantasia_assets_tests.hardening.helpers import config_dict, hidden, near_only, tree, write_config


def _visible(files: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in files.items() if not any(part.startswith(".") for part in k.split("/"))}


@pytest.mark.parametrize("mode", ["shards:10", "shards:75", "summary"])
def test_killed_mid_write__no_partial_file_visible_and_rerun_byte_identical(sample_loaded, tmp_path, mode):
    undisturbed = tmp_path / "undisturbed"
    new = config_dict(undisturbed, **near_only())
    run_lookup(parse_config(new), sample_loaded)
    expected = tree(undisturbed)

    experiment = tmp_path / "experiment"
    # an earlier run with other settings, so that old and new versions of each file differ
    run_lookup(
        parse_config(config_dict(experiment, **{"lookup.limit_per_entry": 3}, **near_only())), sample_loaded
    )
    old = tree(experiment)
    config = write_config(tmp_path / "config.yaml", config_dict(experiment, **near_only()))
    killed = subprocess.run(
        [sys.executable, "-m", "fantasia_assets_tests.hardening.crash_driver", str(config), mode],
        cwd=PROJECT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]

    after = tree(experiment)
    assert hidden(experiment), "the kill should have left a temporary behind"
    for path, digest in _visible(after).items():
        assert digest in (old.get(path), expected.get(path)), f"{path} is neither the old nor the new file"
    if mode == "summary":
        assert after["summary.csv"] == old["summary.csv"] != expected["summary.csv"]

    run_lookup(parse_config(config_dict(experiment, **near_only())), sample_loaded)
    assert tree(experiment) == expected
    assert hidden(experiment) == []


@pytest.fixture(params=["tmpfs", "simulated"])
def small_disk(request, tmp_path):
    """A real 24 MiB tmpfs (when this process may mount one: root in a container), or None for
    a simulated ENOSPC on every write."""
    if request.param == "simulated":
        yield None
        return
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root; the simulated case still runs")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); the simulated case still runs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(mount, leave: int) -> None:
    """Fill the file system of `mount` until only `leave` bytes are free."""
    filler = mount / "filler"
    block = b"\0" * (1 << 20)
    with open(filler, "wb") as handle:
        try:
            while True:
                handle.write(block)
                handle.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def test_disk_full_on_the_output_directory__clean_error_and_earlier_outputs_intact(
    sample_loaded, tmp_path, small_disk, capsys, request
):
    base = small_disk or tmp_path / "simulated"
    experiment = base / "experiment"
    # sequences in every row: outputs several times bigger than the space that will be left
    bigger = {"postprocess.keep_sequences": True, **near_only([0])}
    undisturbed = tmp_path / "undisturbed"
    run_lookup(parse_config(config_dict(undisturbed, **bigger)), sample_loaded)
    expected = tree(undisturbed)
    run_lookup(parse_config(config_dict(experiment, **near_only([0]))), sample_loaded)
    before = tree(experiment)
    if small_disk is not None:
        _fill(small_disk, leave=256 << 10)
    else:  # no tmpfs here: every write under the experiment fails as a full disk would

        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        simulation = pytest.MonkeyPatch()
        request.addfinalizer(simulation.undo)  # even when an assertion fails first
        simulation.setattr(exports, "_write_all", no_space)
        simulation.setattr(exports.os, "writev", no_space)
    config = write_config(tmp_path / "config.yaml", config_dict(experiment, **bigger))
    assert cli.main(["lookup", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot write ") and str(experiment) in err
    assert "No space left on device" in err and "no file was left half-written" in err
    assert "Traceback" not in err
    assert hidden(experiment) == []
    after = tree(experiment)
    assert after.keys() <= before.keys() | expected.keys()
    for path, digest in after.items():  # each file whole: the earlier run's or this run's
        assert digest in (before.get(path), expected.get(path)), path

    if small_disk is not None:
        (small_disk / "filler").unlink()
    else:
        simulation.undo()
    assert cli.main(["lookup", "--config", str(config)]) == 0
    assert tree(experiment) == expected
