"""Paths and state a user gets wrong: config files, FANTASIA_HOME and its folders, the demo's setup.

Each case runs the CLI in-process (`cli.main`) and expects one line `error: ...` and exit 2, or
the documented fallback.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from fantasia_assets import cli, cli_demo
from fantasia_assets.config import load_config
from fantasia_assets_tests.conftest import PROJECT
from fantasia_assets_tests.hardening.helpers import config_dict, write_config


def _fails(argv: list[str], capsys) -> str:
    """Run the CLI; it must exit 2 with one `error:` line and no traceback; returns that line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_config_path_that_is_a_folder__one_line_error_exit_2(tmp_path, capsys):
    err = _fails(["lookup", "--config", str(tmp_path)], capsys)
    assert str(tmp_path) in err and "is a folder" in err


@pytest.mark.parametrize("below", ["", "run/1"])
def test_experiment_path_where_a_file_is__exit_2_naming_the_file_before_any_work(tmp_path, capsys, below):
    blocker = tmp_path / "results"
    blocker.write_text("a user's file\n")
    experiment = blocker / below if below else blocker
    config = write_config(tmp_path / "config.yaml", config_dict(experiment))
    assert cli.main(["lookup", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: {config}: experiment_path: {experiment} cannot be a folder: {blocker} is a file; "
        "choose another experiment_path or move the file away"
    ]
    assert blocker.read_text() == "a user's file\n"


def test_config_in_latin1__one_line_error_naming_the_byte(tmp_path, capsys):
    config = write_config(tmp_path / "config.yaml", config_dict(tmp_path / "out"))
    config.write_bytes(config.read_bytes() + "# café\n".encode("latin-1"))
    err = _fails(["lookup", "--config", str(config)], capsys)
    assert "not UTF-8 text (byte 0xe9" in err and "save the file as UTF-8" in err


def test_config_in_utf16__read_as_the_same_config_in_utf8(tmp_path):
    raw = config_dict(tmp_path / "out")
    utf8 = write_config(tmp_path / "utf8.yaml", raw)
    utf16 = tmp_path / "utf16.yaml"
    utf16.write_bytes(utf8.read_text(encoding="utf-8").encode("utf-16"))  # with its BOM
    assert load_config(utf16) == load_config(utf8)


def test_config_of_nested_aliases_billion_laughs__refused_at_once(tmp_path, capsys):
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 9):
        previous = chr(ord("a") + level - 1)
        lines.append(f"{chr(ord('a') + level)}: &{chr(ord('a') + level)} [{','.join(['*' + previous] * 9)}]")
    config = tmp_path / "laughs.yaml"
    config.write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    err = _fails(["lookup", "--config", str(config)], capsys)
    assert time.monotonic() - started < 10
    assert "once YAML aliases are expanded" in err


def test_config_file_of_several_megabytes__refused_before_parsing(tmp_path, capsys):
    config = write_config(tmp_path / "config.yaml", config_dict(tmp_path / "out"))
    config.write_text(config.read_text() + "# " + "x" * (2 << 20) + "\n")
    assert "a configuration file is at most" in _fails(["lookup", "--config", str(config)], capsys)


@pytest.mark.parametrize("blocked", ["", "pg"])
def test_fantasia_home_or_its_pg_folder_being_a_file__one_line_error(blocked, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    if blocked:
        home.mkdir()
    (home / blocked).write_text("not a folder")
    monkeypatch.setenv("FANTASIA_HOME", str(home))
    monkeypatch.delenv("FANTASIA_DATABASE_URL", raising=False)
    assert f"{home / blocked} is a file" in _fails(["db", "current"], capsys)


def test_cache_folder_being_a_file__one_line_error(database_url, tmp_path, monkeypatch, capsys):
    home = tmp_path / "home"
    home.mkdir()
    (home / "cache").write_text("not a folder")
    monkeypatch.setenv("FANTASIA_HOME", str(home))
    config = write_config(tmp_path / "config.yaml", config_dict(tmp_path / "out"))
    assert f"{home / 'cache'} is a file" in _fails(["lookup", "--config", str(config)], capsys)


def test_corrupt_pg_version__one_line_error_and_no_server_started(tmp_path, monkeypatch, capsys):
    pgdata = tmp_path / "home" / "pg"
    pgdata.mkdir(parents=True)
    (pgdata / "PG_VERSION").write_text("garbage\n")
    monkeypatch.setenv("FANTASIA_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FANTASIA_DATABASE_URL", raising=False)
    err = _fails(["db", "current"], capsys)
    assert "PG_VERSION is corrupt ('garbage'" in err and "move it away" in err
    assert sorted(p.name for p in pgdata.iterdir()) == ["PG_VERSION"]


def test_demo_without_dagster_home_outside_the_repository__makefile_defaults_and_packaged_sample(
    tmp_path, monkeypatch, capsys
):
    import dagster as dg

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("FANTASIA_CONFIG", raising=False)
    monkeypatch.setenv("FANTASIA_HOME", str(tmp_path / "home"))
    cli_demo.demo_environment()
    assert os.environ["DAGSTER_HOME"] == str(tmp_path / ".dagster_home")
    assert "DAGSTER_HOME is not set" in capsys.readouterr().out
    with dg.DagsterInstance.get() as instance:
        assert Path(instance.root_directory) == tmp_path / ".dagster_home"
    config = load_config(os.environ["FANTASIA_CONFIG"])
    assert (config.query_fasta or config.embeddings_path).is_file()
    assert config.experiment_path == tmp_path / "experiments" / "sample"
    assert yaml.safe_load(Path(os.environ["FANTASIA_CONFIG"]).read_text())["embeddings_path"].startswith("/")


def test_demo_and_partitions_with_a_relative_or_missing_dagster_home__one_line_before_any_work(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FANTASIA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("FANTASIA_CONFIG", str(PROJECT / "data" / "config.yaml"))
    monkeypatch.setenv("DAGSTER_HOME", "dagster")
    for command in ("demo", "partitions"):
        assert cli.main([command]) == 2
        err = capsys.readouterr().err
        assert err == f"error: DAGSTER_HOME='dagster' must be an absolute path, e.g. {tmp_path / 'dagster'}\n"
    assert not (tmp_path / "home" / "pg").exists()  # nothing loaded, no server started
    missing = tmp_path / "instances" / "new"
    monkeypatch.setenv("DAGSTER_HOME", str(missing))
    assert cli.main(["partitions"]) == 2
    assert f"DAGSTER_HOME={missing}: no such folder" in capsys.readouterr().err
    monkeypatch.delenv("FANTASIA_CONFIG")
    cli_demo.demo_environment()  # the demo makes it, with the project's settings
    assert (missing / "dagster.yaml").read_bytes() == (PROJECT / "dagster.yaml").read_bytes()
