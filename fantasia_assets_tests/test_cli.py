"""Every command has --help; bad input ends with a clear message and exit status 2."""

import subprocess
import sys

import pytest

COMMANDS = ["load-references", "lookup", "demo"]


@pytest.mark.parametrize("command", [[], *[[c] for c in COMMANDS]])
def test_help(command):
    out = subprocess.run(
        [sys.executable, "-m", "fantasia_assets.cli", *command, "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "usage: fantasia-assets" in out.stdout


def test_load_references_reports_bad_input(database_url, tmp_path, capsys):
    from fantasia_assets.cli import main

    bad = tmp_path / "x.gaf.gz"
    bad.write_bytes(b"\x1f\x8b\x08\x00garbage")
    code = main(["load-references", "--gaf", str(bad), "--fasta", str(bad), "--obo", str(bad)])
    assert code == 2
    assert str(bad) in capsys.readouterr().err


def test_demo_runs_from_a_fresh_folder_and_writes_every_output(database_url, tmp_path):
    """What `make demo` runs (`fantasia-assets demo`), in a folder that is not the repository,
    with neither FANTASIA_CONFIG nor DAGSTER_HOME set: the packaged sample configuration, the
    queries embedded from FASTA, every job, predictions.tsv (the GO graph from the package too)
    and the CAFA evaluation. It once failed at the predictions asset: the demo's configuration
    had no scoring.ontology, and no test ran that configuration through the outputs job."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("FANTASIA_CONFIG", "DAGSTER_HOME")}
    env.update(FANTASIA_HOME=str(tmp_path / "home"), PYTHONWARNINGS="ignore")
    done = subprocess.run(
        [sys.executable, "-m", "fantasia_assets.cli", "demo"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    experiment = tmp_path / "experiments" / "sample"
    for name in ("summary.csv", "predictions.tsv", "query_embeddings.h5", "lineage.duckdb"):
        assert (experiment / name).is_file(), name
    assert (experiment / "topgo" / "ensemble" / "P.topgo").is_file()
    assert (experiment / "evaluation" / "metrics.tsv").is_file()
    predictions = (experiment / "predictions.tsv").read_text().splitlines()
    assert len(predictions) > 1 and predictions[0].split("\t")[:2] == ["accession", "go_id"]
    assert "CAFA evaluation" in done.stdout
