"""CAFA evaluation: metrics equal cafaeval run by hand, IA by hand, the ontology subset changes nothing, clear errors."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from fantasia_assets.core.evaluation import (
    EvaluationError,
    evaluate,
    experiment_outputs,
    truth_table,
    write_evaluation,
)
from fantasia_assets.core.ontology import read_ontology

from .go_tiny import tiny_obo

TRUTH = pl.DataFrame(
    {
        "accession": ["A", "A", "B", "B", "C", "D"],
        "go_id": ["GO:0000002", "GO:0000011", "GO:0000099", "GO:0000020", "GO:0000003", "GO:0000010"],
    }
)
REFERENCES = pl.DataFrame(
    {
        "protein_id": ["r1", "r2", "r2", "r3", "r4", "r4", "r5"],
        "go_id": [
            "GO:0000002",
            "GO:0000004",
            "GO:0000011",
            "GO:0000001",
            "GO:0000020",
            "GO:0000010",
            "GO:0000005",
        ],
    }
)
OUTPUTS = {
    "good": pl.DataFrame(
        {
            "accession": ["A", "A", "B", "B", "C", "D", "D"],
            "go_id": [
                "GO:0000002",
                "GO:0000011",
                "GO:0000004",
                "GO:0000020",
                "GO:0000001",
                "GO:0000010",
                "GO:0000011",
            ],
            "score": [0.9, 0.55, 0.8, 0.3, 0.42, 0.66, 0.2],
        }
    ),
    # misses C and D entirely, and carries an unknown id that must be dropped, not fatal
    "partial": pl.DataFrame(
        {
            "accession": ["A", "A", "B", "Z"],
            "go_id": ["GO:0000001", "GO:9999999", "GO:0000003", "GO:0000002"],
            "score": [0.7, 0.9, 0.35, 0.8],
        }
    ),
}


@pytest.fixture(scope="module")
def ontology(tmp_path_factory):
    return read_ontology(tiny_obo(tmp_path_factory.mktemp("go")))


def test_information_accretion_by_hand(ontology):
    ia = dict(ontology.information_accretion(REFERENCES).iter_rows())
    # propagated BP carriers: 8150 {r1,r2,r3,r5}; 1 {r1,r2,r3}; 2 {r1}; 3 {r2}; 4 {r2}; 5 {r5}
    assert ia["GO:0008150"] == 0.0
    assert ia["GO:0000001"] == pytest.approx(-math.log2(3 / 4))
    assert ia["GO:0000002"] == pytest.approx(-math.log2(1 / 3))
    # 3's parents are 8150 and 1 (part_of): carriers of both are {r1,r2,r3}
    assert ia["GO:0000003"] == pytest.approx(-math.log2(1 / 3))
    assert ia["GO:0000004"] == 0.0
    assert ia["GO:0000005"] == pytest.approx(-math.log2(1 / 4))
    assert ia["GO:0000011"] == pytest.approx(-math.log2(1 / 2))
    assert "GO:0000030" not in ia


def _by_hand(tmp_path, ontology) -> dict[tuple[str, str], dict[str, float]]:
    """cafaeval on files written here, the whole ontology, metrics picked from its table."""
    from cafaeval.evaluation import cafa_eval

    (tmp_path / "pred").mkdir()
    for name, frame in OUTPUTS.items():
        frame.write_csv(tmp_path / "pred" / f"{name}.tsv", separator="\t", include_header=False)
    TRUTH.write_csv(tmp_path / "gt.tsv", separator="\t", include_header=False)
    ontology.information_accretion(REFERENCES).write_csv(
        tmp_path / "ia.tsv", separator="\t", include_header=False
    )
    df, _ = cafa_eval(
        str(ontology.source), str(tmp_path / "pred"), str(tmp_path / "gt.tsv"), ia=str(tmp_path / "ia.tsv"),
        no_orphans=True,
    )  # fmt: skip
    aspect = {"biological_process": "P", "molecular_function": "F", "cellular_component": "C"}
    expected = {}
    for (filename, ns), group in df.reset_index().groupby(["filename", "ns"]):
        best = group.loc[group["f"].idxmax()]
        expected[(filename.removesuffix(".tsv"), aspect[ns])] = {
            "fmax": best["f"], "threshold": best["tau"], "coverage": best["cov"],
            "wfmax": group["f_w"].max(), "smin": group["s_w"].min(),
        }  # fmt: skip
    return expected


def test_metrics_equal_cafaeval_by_hand(tmp_path, ontology):
    result = evaluate(OUTPUTS, TRUTH, ontology, REFERENCES)
    paths = write_evaluation(tmp_path / "evaluation", result, precision=6)
    written = pl.read_csv(paths["metrics"], separator="\t")
    assert written.columns == ["output", "aspect", "fmax", "smin", "wfmax", "coverage", "threshold"]
    (tmp_path / "hand").mkdir()
    expected = _by_hand(tmp_path / "hand", ontology)
    rows = {(r["output"], r["aspect"]): r for r in written.iter_rows(named=True)}
    assert set(rows) == {(o, a) for o in OUTPUTS for a in "PFC"}
    for key, metrics in expected.items():
        for name, value in metrics.items():
            assert rows[key][name] == pytest.approx(value, abs=1e-3), (key, name)
    # an aspect the output never predicts for its targets: Fmax 0, not left out
    assert rows[("partial", "C")]["fmax"] == 0.0 and ("partial", "C") not in expected
    assert paths["plot"].read_bytes().startswith(b"\x89PNG")


def test_ontology_subset_gives_the_whole_ontologys_metrics(ontology):
    fast = evaluate(OUTPUTS, TRUTH, ontology, REFERENCES)
    whole = evaluate(OUTPUTS, TRUTH, ontology, REFERENCES, whole_ontology=True)
    assert fast.metrics.columns == whole.metrics.columns
    for column in ("fmax", "smin", "wfmax", "coverage", "threshold"):
        np.testing.assert_allclose(
            fast.metrics[column].fill_null(-1).to_numpy(), whole.metrics[column].fill_null(-1).to_numpy()
        )


def test_truth_without_queries_is_an_error():
    annotations = TRUTH.rename({"accession": "protein_id"})
    with pytest.raises(EvaluationError, match=r"goa\.gaf: none of its 4 proteins is among the 2 queries"):
        truth_table(annotations, ["X", "Y"], "goa.gaf")
    assert truth_table(annotations, ["A", "X"], "goa.gaf")["accession"].unique().to_list() == ["A"]


def test_empty_output_is_an_error(ontology):
    empty = {
        "predictions": pl.DataFrame(schema={"accession": pl.String, "go_id": pl.String, "score": pl.Float64})
    }
    with pytest.raises(EvaluationError, match="output 'predictions' is empty"):
        evaluate(empty, TRUTH, ontology, REFERENCES)


def test_unknown_ids_are_reported(ontology, caplog):
    evaluate({"partial": OUTPUTS["partial"]}, TRUTH, ontology, REFERENCES)
    assert "partial: 1 GO ids not in the ontology dropped (GO:9999999)" in caplog.text


def test_experiment_outputs_reads_every_output(tmp_path):
    (tmp_path / "topgo" / "M" / "layer_0").mkdir(parents=True)
    (tmp_path / "topgo" / "ensemble").mkdir(parents=True)
    (tmp_path / "topgo" / "M" / "layer_0" / "P.topgo").write_text("A\tGO:0000002\t0.9\n")
    (tmp_path / "topgo" / "ensemble" / "P.topgo").write_text("A\tGO:0000002\t0.9\nB\tGO:0000001\t0.5\n")
    (tmp_path / "summary.csv").write_text(
        "accession,go_id,final_score_M_L0\nA,GO:0000002,0.7\nB,GO:0000001,\n"
    )
    (tmp_path / "predictions.tsv").write_text("accession\tgo_id\taspect\tscore\nA\tGO:0000002\tP\t0.5\n")
    outputs = experiment_outputs(tmp_path)
    assert sorted(outputs) == ["predictions", "summary_final_score_M_L0", "topgo_M_layer_0", "topgo_ensemble"]
    assert outputs["topgo_ensemble"].height == 2
    assert outputs["summary_final_score_M_L0"].rows() == [("A", "GO:0000002", 0.7)]
    with pytest.raises(EvaluationError, match="run the lookup"):
        experiment_outputs(tmp_path / "nothing")
