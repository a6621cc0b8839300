"""The database password comes only from FANTASIA_DATABASE_URL and is shown nowhere.

The embedded server trusts its Unix socket, so a URL with a password is accepted and the
password ignored (the commands below succeed with it). Every test puts a distinctive password
into the test database's URL and looks for it in what the commands print, in every log record,
in the Dagster instance (event log, run configs, captured logs, every file of the instance
directory) and in error messages.
"""

from __future__ import annotations

import importlib
import logging
import os
import subprocess
import sys
import traceback
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa
import yaml

from fantasia_assets.cli import main
from fantasia_assets.config import ConfigError, load_config
from fantasia_assets.sample import SAMPLE_CONFIG, SAMPLE_DIR

PASSWORD = "Sup3r-S3cret-pw"
AT_PASSWORD = "Sup3r@S3cret-pw"  # an unescaped '@' splits it: neither half may show
FRAGMENTS = ("Sup3r", "S3cret")


def _with_password(url: sa.engine.URL, form: str, password: str = PASSWORD) -> str:
    """The URL as a user would write it, the password in user info or as a query parameter."""
    plain = url.set(drivername="postgresql", username="postgres")
    if form == "query":
        return plain.update_query_dict({"password": password}).render_as_string(hide_password=False)
    text = plain.set(password=password).render_as_string(hide_password=False)
    return text.replace("%40", "@") if "@" in password else text  # written unescaped on purpose


def _assert_no_secret(text: str, where: str) -> None:
    for fragment in FRAGMENTS:
        assert fragment not in text, f"the password ({fragment!r}) appears in {where}"


def _config_file(tmp_path: Path) -> Path:
    raw = yaml.safe_load(SAMPLE_CONFIG.read_text())
    raw["experiment_path"] = str(tmp_path / "experiment")
    raw["embeddings_path"] = str(SAMPLE_DIR / "queries.h5")
    raw["lookup"]["use_gpu"] = False
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fantasia_assets.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("form", ["userinfo", "query"])
def test_cli_load_and_lookup_with_a_password_in_the_url__password_in_no_output_or_log(
    sample_loaded, database_url, fantasia_home, tmp_path, form
):
    env = {"FANTASIA_DATABASE_URL": _with_password(database_url, form), "FANTASIA_HOME": str(fantasia_home)}
    load = _cli(
        "-v", "load-references",
        "--fasta", str(SAMPLE_DIR / "references.fasta.gz"), "--gaf", str(SAMPLE_DIR / "references.gaf.gz"),
        "--obo", str(SAMPLE_DIR / "go-basic.obo.gz"),
        "--embeddings", str(SAMPLE_DIR / "references_near.h5"), "--model", "NEAR",
        env=env,
    )  # fmt: skip
    assert load.returncode == 0, load.stderr
    assert "reference database: postgresql+psycopg://postgres:" in load.stdout  # the URL is shown, masked
    assert "proteins:" in load.stdout
    lookup = _cli("-v", "lookup", "--config", str(_config_file(tmp_path)), env=env)
    assert lookup.returncode == 0, lookup.stderr
    assert "DEBUG fantasia_assets." in lookup.stderr  # -v: every logger's debug records reach stderr
    for name, run in (("load-references", load), ("lookup", lookup)):
        _assert_no_secret(run.stdout, f"{name} stdout")
        _assert_no_secret(run.stderr, f"{name} stderr (all logging at DEBUG)")
    for path in (tmp_path / "experiment").rglob("*"):
        if path.is_file():
            _assert_no_secret(path.read_bytes().decode("utf-8", "replace"), str(path))


def test_asset_graph_materialised_with_a_password_in_the_url__password_nowhere_in_dagster(
    sample_loaded, database_url, fantasia_home, tmp_path, monkeypatch, caplog, capsys
):
    import fantasia_assets.definitions as definitions
    from fantasia_assets.defs import demo

    monkeypatch.setenv("FANTASIA_DATABASE_URL", _with_password(database_url, "userinfo"))
    monkeypatch.setenv("FANTASIA_CONFIG", str(_config_file(tmp_path)))
    caplog.set_level(logging.DEBUG)
    instance_dir = tmp_path / "dagster"
    instance_dir.mkdir()
    importlib.reload(definitions)  # resources read the environment at import
    try:
        with dg.instance_for_test(temp_dir=str(instance_dir)) as instance:
            demo.materialize_everything(instance)
            runs = instance.get_runs()
            assert len(runs) == 7  # query embeddings, shared inputs, four partitions, run-wide outputs
            labels = []
            for run in runs:
                _assert_no_secret(dg.serialize_value(run), f"run {run.run_id} (config, tags)")
                for entry in instance.all_logs(run.run_id):
                    _assert_no_secret(dg.serialize_value(entry), f"event {entry.dagster_event_type}")
                    materialization = entry.asset_materialization
                    if materialization and "database" in materialization.metadata:
                        labels.append(materialization.metadata["database"].value)
            assert labels and all("postgres:***@" in label for label in labels)  # shown, masked
    finally:
        monkeypatch.undo()
        importlib.reload(definitions)
    captured = capsys.readouterr()
    _assert_no_secret(captured.out + captured.err, "printed output")
    _assert_no_secret(caplog.text, "Python logging")
    files = [p for p in instance_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".db" for p in files)  # the event log storage is in there
    for path in [*files, *(p for p in (tmp_path / "experiment").rglob("*") if p.is_file())]:
        _assert_no_secret(path.read_bytes().decode("utf-8", "replace"), str(path))


def test_reference_database_resource_from_the_environment__repr_and_label_hide_the_password(
    database_url, monkeypatch
):
    from fantasia_assets.defs.resources import ReferenceDatabase

    monkeypatch.setenv("FANTASIA_DATABASE_URL", _with_password(database_url, "userinfo"))
    resource = ReferenceDatabase(url=dg.EnvVar("FANTASIA_DATABASE_URL")).process_config_and_initialize()
    assert resource.url and PASSWORD in resource.url  # resolved, usable
    _assert_no_secret(repr(resource), "repr of the resource")
    _assert_no_secret(str(resource), "str of the resource")
    label = resource.label()
    assert label.startswith("postgresql+psycopg://postgres:***@")
    _assert_no_secret(label, "label")


@pytest.mark.parametrize(
    "form, password",
    [("userinfo", PASSWORD), ("query", PASSWORD), ("userinfo", AT_PASSWORD)],
    ids=["userinfo", "query", "unescaped_at"],
)
@pytest.mark.parametrize("command", ["load-references", "lookup"])
def test_unreachable_database_with_a_password_in_the_url__error_does_not_show_it(
    fantasia_home, tmp_path, monkeypatch, caplog, capsys, command, form, password
):
    from fantasia_assets.db.engine import dispose_engines

    nowhere = sa.engine.make_url(f"postgresql:///fantasia?host={tmp_path / 'nonexistent'}")
    monkeypatch.setenv("FANTASIA_DATABASE_URL", _with_password(nowhere, form, password))
    caplog.set_level(logging.DEBUG)
    if command == "load-references":
        argv = ["-v", "load-references", "--obo", str(SAMPLE_DIR / "go-basic.obo.gz")]
    else:
        argv = ["-v", "lookup", "--config", str(_config_file(tmp_path))]
    try:
        code, raised = main(argv), ""
    except Exception as exc:  # what an uncaught error prints
        code, raised = 1, "".join(traceback.format_exception(exc))
    finally:
        dispose_engines()
    captured = capsys.readouterr()
    shown = captured.out + captured.err + raised + caplog.text
    assert code != 0
    # the error is about the connection (the socket path, or the malformed URL)
    assert "nonexistent" in shown or "percent-encode" in shown, shown
    _assert_no_secret(shown, "the error output")


def test_config_file_with_database_keys_of_the_original__rejected_pointing_to_the_env_var(tmp_path):
    raw = yaml.safe_load(SAMPLE_CONFIG.read_text())
    for key, value in (("DB_PASSWORD", PASSWORD), ("DB_USERNAME", "fantasia"), ("DB_HOST", "db.example")):
        path = tmp_path / f"{key}.yaml"
        path.write_text(yaml.safe_dump({key: value, **raw}))
        with pytest.raises(ConfigError) as error:
            load_config(path)
        message = str(error.value)
        assert repr(key) in message and "FANTASIA_DATABASE_URL" in message, message
        _assert_no_secret(message, "the configuration error")
    nested = {**raw, "lookup": {**raw["lookup"], "password": PASSWORD}}
    (tmp_path / "nested.yaml").write_text(yaml.safe_dump(nested))
    with pytest.raises(ConfigError, match=r"'lookup\.password' holds a password.*FANTASIA_DATABASE_URL"):
        load_config(tmp_path / "nested.yaml")
    assert load_config(SAMPLE_CONFIG).enabled_models()  # the bundled configuration still parses


def test_config_file_malformed_next_to_a_password__yaml_error_does_not_quote_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(f'experiment_path: ./x\nDB_PASSWORD: "{PASSWORD}\n')  # unclosed quote
    with pytest.raises(ConfigError, match="not valid YAML") as error:
        load_config(path)
    assert "line 2" in str(error.value)  # where, still
    _assert_no_secret(str(error.value), "the YAML error")
    _assert_no_secret("".join(traceback.format_exception(error.value)), "the YAML error's traceback")
