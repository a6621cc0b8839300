"""What a small lookup pays besides its work: the collector around imports and exit, imports in the
background (`startup`), the run-wide outputs written side by side (`run_outputs`,
`core.timing.timed_concurrently`) and the shard files made ahead (`core.ahead`)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys

from fantasia_assets import cli, run_outputs, startup
from fantasia_assets.config import parse_config
from fantasia_assets.core import ahead
from fantasia_assets.core.timing import timed
from fantasia_assets.runner import run_lookup
from fantasia_assets_tests.conftest import PROJECT
from fantasia_assets_tests.hardening.helpers import config_dict, near_only, tree, write_config


def _in_turn(timings, stages, into=None):
    """The plain way: the run-wide stages (and the last shards) one after the other, in their order."""
    results = {}
    for name, stage in stages.items():
        with timed((into or {}).get(name, timings), name):
            results[name] = stage()
    return results


def test_outputs_are_the_same_side_by_side_in_turn_and_from_the_program(sample_loaded, tmp_path, monkeypatch):
    both = near_only()
    made, real = [], ahead.create_ahead

    def spy(folders):
        made.extend(folders)
        real(made)

    with monkeypatch.context() as patch:
        patch.setattr(ahead, "create_ahead", spy)
        run_lookup(parse_config(config_dict(tmp_path / "side", **both)), sample_loaded)
    assert [target.name for target, _, _ in made] == ["layer_0", "layer_1"]  # both shard folders made ahead
    with monkeypatch.context() as patch:
        patch.setattr(run_outputs, "timed_concurrently", _in_turn)
        run_lookup(parse_config(config_dict(tmp_path / "turn", **both)), sample_loaded)
    with monkeypatch.context() as patch:  # the plain way: no shard file made ahead (`core.ahead`)
        patch.setattr(ahead, "create_ahead", lambda folders: None)
        run_lookup(parse_config(config_dict(tmp_path / "plain", **both)), sample_loaded)
    # the command as a program: the collector paused over the imports, skipped at the exit
    config = write_config(tmp_path / "config.yaml", config_dict(tmp_path / "program", **both))
    done = subprocess.run(
        [sys.executable, "-m", "fantasia_assets.cli", "lookup", "--config", str(config)],
        cwd=PROJECT,
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "overlap (stages run side by side)" in done.stdout  # the stage table still adds up
    side = tree(tmp_path / "side")
    assert "summary.csv" in side and any(path.startswith("topgo/") for path in side)
    assert side == tree(tmp_path / "turn") == tree(tmp_path / "program") == tree(tmp_path / "plain")


def _program(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_collector_is_paused_over_the_imports_then_runs_with_their_objects_frozen():
    out = _program(
        "import gc\n"
        "from fantasia_assets import startup\n"
        "startup.pause_for_imports()\n"
        "print(gc.isenabled(), gc.get_freeze_count() == 0)\n"
        "import fantasia_assets.runner\n"
        "startup.imports_done()\n"
        "print(gc.isenabled(), gc.get_freeze_count() > 10000)\n"
        "startup.imports_done()\n"  # twice: nothing more
        "gc.disable()\n"
        "startup.pause_for_imports()\n"
        "startup.imports_done()\n"  # a collector disabled by someone else stays disabled
        "print(gc.isenabled())\n"
    )
    assert out.split() == ["False", "True", "True", "True", "False"]


def test_a_command_called_in_a_process_leaves_its_collector_alone(tmp_path, capsys):
    frozen = gc.get_freeze_count()
    assert cli.main(["lookup", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "error:" in capsys.readouterr().err
    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_modules_imported_in_the_background_are_loaded_once_and_a_missing_one_is_left_to_its_importer():
    out = _program(
        "import sys, threading\n"
        "from fantasia_assets import startup\n"
        "startup.import_in_background('no_such_module_here', 'json.tool', 'duckdb')\n"
        "[t.join() for t in threading.enumerate() if t.name == 'imports']\n"
        "print('json.tool' in sys.modules, 'duckdb' in sys.modules, 'no_such_module_here' in sys.modules)\n"
        "import duckdb\n"  # the later import finds it loaded
        "print(duckdb is sys.modules['duckdb'])\n"
        "try:\n"
        "    import no_such_module_here\n"
        "except ImportError as error:\n"
        "    print(type(error).__name__)\n"
    )
    assert out.split() == ["True", "True", "False", "True", "ModuleNotFoundError"]


def test_openblas_workers_are_told_to_sleep_unless_the_environment_says_otherwise(monkeypatch):
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    startup.quiet_blas_workers()
    assert os.environ["OPENBLAS_THREAD_TIMEOUT"] == "4"
    monkeypatch.setenv("OPENBLAS_THREAD_TIMEOUT", "12")
    startup.quiet_blas_workers()
    assert os.environ["OPENBLAS_THREAD_TIMEOUT"] == "12"
    # the command as a program sets it before numpy (and OpenBLAS) is loaded
    code = "import sys; from fantasia_assets import cli; print('numpy' in sys.modules)"
    assert _program(code).split() == ["False"]


def test_pydantic_plugins_are_skipped_inside_the_block_only_unless_the_environment_says(monkeypatch):
    monkeypatch.delenv("PYDANTIC_DISABLE_PLUGINS", raising=False)
    with startup.pydantic_plugins_skipped():
        assert os.environ["PYDANTIC_DISABLE_PLUGINS"] == "__all__"
    assert "PYDANTIC_DISABLE_PLUGINS" not in os.environ
    monkeypatch.setenv("PYDANTIC_DISABLE_PLUGINS", "some_plugin")
    with startup.pydantic_plugins_skipped():
        assert os.environ["PYDANTIC_DISABLE_PLUGINS"] == "some_plugin"
    assert os.environ["PYDANTIC_DISABLE_PLUGINS"] == "some_plugin"


def test_the_lookup_imports_neither_psutil_nor_multiprocessing():
    """What a stamp-served lookup imports on its way (`cli._lookup`) leaves out psutil (the memory
    budget reads /proc/meminfo) and multiprocessing (only a big query file's scan uses it)."""
    code = (
        "import sys\n"
        "from fantasia_assets import cli, startup\n"
        "with startup.pydantic_plugins_skipped():\n"
        "    import fantasia_assets.config\n"
        "import fantasia_assets.runner, fantasia_assets.incremental_run, fantasia_assets.db.snapshot\n"
        "from fantasia_assets.core.knn_inputs import cpu_memory_budget\n"
        "cpu_memory_budget()\n"
        "print(*(name in sys.modules for name in ('psutil', 'multiprocessing')))\n"
    )
    assert _program(code).split() == ["False", "False"]
