"""evaluate and train-scorer from the command line: --help, the scoring keys, clear errors (exit 2)."""

import subprocess
import sys

import pytest
import yaml

from fantasia_assets.cli import main
from fantasia_assets.config import ConfigError, parse_config
from fantasia_assets_tests.core.go_tiny import tiny_obo


@pytest.mark.parametrize("command", ["evaluate", "train-scorer"])
def test_help(command):
    out = subprocess.run(
        [sys.executable, "-m", "fantasia_assets.cli", command, "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0
    assert "--truth" in out.stdout and "usage: fantasia-assets" in out.stdout


def _config(tmp_path, scoring=None):
    raw = {
        "experiment_path": str(tmp_path / "exp"),
        "embeddings_path": str(tmp_path / "q.h5"),
        "embedding": {"models": {"NEAR": {"layer_index": [0]}}},
    }
    if scoring is not None:
        raw["scoring"] = scoring
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path, raw


def test_scoring_keys(tmp_path):
    _, raw = _config(tmp_path, {"ontology": "go.obo", "model": "m.pkl"})
    scoring = parse_config(raw).scoring
    assert scoring.ontology.name == "go.obo" and scoring.model.name == "m.pkl"
    _, raw = _config(tmp_path, {"modle": "m.pkl"})
    with pytest.raises(ConfigError, match="modle"):
        parse_config(raw)


def test_evaluate_without_an_ontology_says_where_to_give_one(tmp_path, capsys):
    config, _ = _config(tmp_path)
    assert main(["evaluate", "--config", str(config), "--truth", str(tmp_path / "t.gaf")]) == 2
    assert "pass --obo or set scoring.ontology" in capsys.readouterr().err


def test_evaluate_with_a_truth_missing_the_queries(tmp_path, capsys):
    config, _ = _config(tmp_path)
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "query_index_mapping.csv").write_text(
        "query_idx,query_fasta_id,accessions,sequence_length\n0,Q0,A|B,10\n"
    )
    line = ["UniProtKB", "X1", "x", "", "GO:0000002", "PMID:1", "IDA", "", "P", "", "", "protein", "taxon:10090",
            "20190101", "UniProt", "", ""]  # fmt: skip
    gaf = tmp_path / "t.gaf"
    gaf.write_text("!gaf-version: 2.1\n" + "\t".join(line) + "\n")
    obo = tiny_obo(tmp_path)
    code = main(["evaluate", "--config", str(config), "--truth", str(gaf), "--obo", str(obo)])
    assert code == 2
    assert "t.gaf: none of its 1 proteins is among the 2 queries" in capsys.readouterr().err
