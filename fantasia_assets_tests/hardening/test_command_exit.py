"""How a command ends when the user stops it, or when it fails before its background work is done."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from fantasia_assets import cli
from fantasia_assets_tests.hardening.helpers import config_dict, write_config


def test_sigint_during_a_lookup__one_error_line_exit_130_and_the_outputs_as_before(
    sample_loaded, tmp_path, capsys, monkeypatch
):
    experiment = tmp_path / "experiment"
    config = write_config(tmp_path / "config.yaml", config_dict(experiment))
    assert cli.main(["lookup", "--config", str(config)]) == 0
    published = {path: path.read_bytes() for path in experiment.rglob("*") if path.is_file()}
    capsys.readouterr()

    import fantasia_assets.runner as runner

    original = runner.search_partition

    def interrupted(*args, **kwargs):  # the user's Ctrl-C, while the search runs
        original(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "search_partition", interrupted)
    assert cli.main(["lookup", "--full", "--config", str(config)]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert [line for line in err.splitlines() if line.startswith("error: ")] == [
        next(line for line in err.splitlines() if line.startswith("error: interrupted: "))
    ]
    assert {path: path.read_bytes() for path in experiment.rglob("*") if path.is_file()} == published


def test_command_ending_while_its_background_imports_still_run__the_exit_waits_for_them(tmp_path):
    # A thread still inside DuckDB's C++ start-up when the interpreter exits is unwound by force,
    # which that code does not allow: an early error ended in an abort (exit 134) after its
    # message. The exit now waits for the imports; here the work after them leaves a mark.
    mark = tmp_path / "finished"
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from fantasia_assets import startup

        def slow():
            time.sleep(0.5)
            Path({str(mark)!r}).write_text("done")

        startup.import_in_background("json", then=slow)
        sys.exit(2)  # the command's early error
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert mark.read_text() == "done"
