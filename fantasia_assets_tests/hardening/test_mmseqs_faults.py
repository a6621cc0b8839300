"""MMseqs2 missing, failing or killed during `fantasia-assets lookup` with redundancy masking on.

End to end through `cli.main`, on the bundled sample: the user gets exit status 2 and an `error:`
message that says what went wrong and what to do, never a traceback, and the outputs of an
earlier successful run in the same experiment_path are left exactly as they were (clustering
runs before anything is written). `core/test_redundancy.py` covers `cluster_sequences` itself.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import yaml

from fantasia_assets.cli import main
from fantasia_assets.core import redundancy
from fantasia_assets.sample import SAMPLE_DIR
from fantasia_assets_tests.conftest import PROJECT
from fantasia_assets_tests.hardening.helpers import tree


def _config_file(tmp_path: Path) -> Path:
    raw = yaml.safe_load((PROJECT / "data" / "config.yaml").read_text())
    raw["experiment_path"] = str(tmp_path / "experiment")
    raw["embeddings_path"] = str(SAMPLE_DIR / "queries.h5")
    raw["lookup"]["redundancy"]["identity"] = 0.95
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _fake_mmseqs(tmp_path: Path, body: str) -> Path:
    fake = tmp_path / "bin" / "mmseqs"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\n" + body)
    fake.chmod(0o755)
    return fake


def _successful_run(tmp_path: Path, capsys) -> tuple[Path, Path, dict[str, str]]:
    """(config, experiment_path, digests) after a lookup with the real MMseqs2."""
    config = _config_file(tmp_path)
    assert main(["lookup", "--config", str(config)]) == 0
    capsys.readouterr()
    experiment = tmp_path / "experiment"
    digest = tree(experiment)
    assert "summary.csv" in digest
    return config, experiment, digest


def _no_work_folders_left(fantasia_home: Path) -> bool:
    return not list((fantasia_home / "cache" / "mmseqs").glob(".mmseqs-work-*"))


def test_mmseqs_path_that_does_not_exist__one_line_error_and_outputs_kept(
    sample_loaded, fantasia_home, tmp_path, capsys, monkeypatch
):
    config, experiment, before = _successful_run(tmp_path, capsys)
    missing = tmp_path / "nowhere" / "mmseqs"
    monkeypatch.setenv(redundancy.BINARY_ENV, str(missing))

    assert main(["lookup", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # exactly one line
    assert "Traceback" not in err
    assert str(missing) in err and "does not exist" in err
    assert f"unset {redundancy.BINARY_ENV}" in err  # how to fix it
    assert tree(experiment) == before


def test_mmseqs_exits_with_an_error__exit_code_and_its_stderr_and_outputs_kept(
    sample_loaded, fantasia_home, tmp_path, capsys, monkeypatch
):
    config, experiment, before = _successful_run(tmp_path, capsys)
    fake = _fake_mmseqs(tmp_path, "echo 'Error: createdb cannot allocate the database' >&2\nexit 1\n")
    monkeypatch.setenv(redundancy.BINARY_ENV, str(fake))

    assert main(["lookup", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err[err.index("error: ") :].splitlines()
    assert "MMseqs2 failed with exit code 1" in lines[0] and "createdb" in lines[0]
    assert "Error: createdb cannot allocate the database" in err  # the tail of its stderr
    assert all(line.startswith("  ") for line in lines[1:])  # the rest reads as part of the error
    assert tree(experiment) == before
    assert _no_work_folders_left(fantasia_home)


def test_mmseqs_killed_by_a_signal__error_names_the_signal_and_outputs_kept(
    sample_loaded, fantasia_home, tmp_path, capsys, monkeypatch
):
    config, experiment, before = _successful_run(tmp_path, capsys)
    fake = _fake_mmseqs(tmp_path, "echo 'clustering step 1' >&2\nkill -9 $$\n")
    monkeypatch.setenv(redundancy.BINARY_ENV, str(fake))

    assert main(["lookup", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    first = err[err.index("error: ") :].splitlines()[0]
    assert "killed by signal SIGKILL" in first and "exit code" not in first
    assert "out of memory" in err  # what SIGKILL usually means, and so what to try
    assert tree(experiment) == before
    assert _no_work_folders_left(fantasia_home)


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mmseqs_fails_while_a_progress_line_is_drawn__error_starts_on_its_own_line(
    sample_loaded, tmp_path, monkeypatch
):
    config = _config_file(tmp_path)
    monkeypatch.setenv(redundancy.BINARY_ENV, str(_fake_mmseqs(tmp_path, "exit 1\n")))
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)

    assert main(["lookup", "--config", str(config)]) == 2
    screen = [line.rsplit("\r", 1)[-1] for line in terminal.getvalue().split("\n")]
    assert any(line.startswith("\x1b[2Kmmseqs2 createdb: 0/3") for line in screen)  # drawn, unfinished
    errors = [line for line in screen if "error: " in line]
    assert len(errors) == 1 and errors[0].startswith("error: "), terminal.getvalue()
