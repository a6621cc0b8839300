"""predictions.tsv scores and the learned scorer's features, hand-checked on a tiny case; DAG
consistency; the protein-grouped folds; refusals of a model made for another lookup."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from fantasia_assets.core import scorer as sc
from fantasia_assets.core.ontology import read_ontology
from fantasia_assets.core.scoring import heuristic_scores

from .go_tiny import tiny_obo


def raw_rows() -> pl.DataFrame:
    """Query Q: in layer 0, r1 (d 0.1, id 0.5) carries GO:2 (IDA); r2 (d 0.3, id 0.25) carries
    GO:4 (TAS) and GO:11 (EXP). In layer 1, r1 alone at d 0.2."""
    rows = [
        ("Q", "M", 0, 1, "GO:0000002", 0.1, 0.5, 0.6, 0.7, "IDA"),
        ("Q", "M", 0, 2, "GO:0000004", 0.3, 0.25, 0.3, 0.4, "TAS"),
        ("Q", "M", 0, 2, "GO:0000011", 0.3, 0.25, 0.3, 0.4, "EXP"),
        ("Q", "M", 1, 1, "GO:0000002", 0.2, 0.5, 0.6, 0.7, "IDA"),
    ]
    names = ["accession", "model_name", "layer_index", "ref_idx", "go_id", "distance", "identity", "similarity",
             "identity_sw", "evidence_code"]  # fmt: skip
    frame = pl.DataFrame(rows, schema=names, orient="row").with_columns(pl.col("layer_index").cast(pl.Int64))
    return frame.with_columns((1 - pl.col("distance")).alias("reliability_index"))


@pytest.fixture(scope="module")
def ontology(tmp_path_factory):
    return read_ontology(tiny_obo(tmp_path_factory.mktemp("go")))


def test_heuristic_scores_by_hand(ontology):
    scores = {go: s for _, go, _, s in heuristic_scores(raw_rows(), ontology).iter_rows()}
    # layer 0 weights (RI × identity): r1 0.45, r2 0.175; layer 1: r1 0.4; each vote times
    # √(best weight in the aspect); mean over the 2 layers
    bp0, mf0, bp1 = 0.45**0.5, 0.175**0.5, 0.4**0.5
    expected = {
        "GO:0000001": (bp0 + bp1) / 2,
        "GO:0000002": (0.45 / 0.625 * bp0 + bp1) / 2,
        "GO:0000003": (0.175 / 0.625 * bp0) / 2,
        "GO:0000004": (0.175 / 0.625 * bp0) / 2,
        "GO:0000010": mf0 / 2,
        "GO:0000011": mf0 / 2,
    }
    assert scores.keys() == expected.keys()  # roots left out
    for go, value in expected.items():
        assert scores[go] == pytest.approx(value), go


def assert_consistent(predictions: pl.DataFrame, ontology) -> None:
    score = {(a, g): s for a, g, _, s in predictions.iter_rows()}
    assert predictions["score"].is_between(0.0, 1.0).all()
    assert not set(predictions["go_id"]) & ontology.roots
    for (accession, go), value in score.items():
        for parent in ontology.parents[go]:
            if parent not in ontology.roots:
                assert score[(accession, parent)] >= value, (go, parent)
    for _, go, aspect, _ in predictions.iter_rows():
        assert ontology.aspect[go] == aspect


def test_scores_are_consistent_with_the_dag(ontology):
    assert_consistent(heuristic_scores(raw_rows(), ontology), ontology)
    # a learned model's raw probabilities need not be: consistent() lifts them
    from fantasia_assets.core.scoring import consistent

    wild = pl.DataFrame({"accession": ["Q", "Q", "Q"], "go_id": ["GO:0000004", "GO:0000003", "GO:0000001"],
                         "score": [0.9, 0.2, 0.1]})  # fmt: skip
    lifted = consistent(wild, ontology)
    assert_consistent(lifted, ontology)
    assert dict(zip(lifted["go_id"], lifted["score"], strict=True)) == {
        "GO:0000001": 0.9, "GO:0000003": 0.9, "GO:0000004": 0.9,
    }  # fmt: skip


def test_features_by_hand(ontology):
    references = pl.DataFrame(
        {"protein_id": ["a", "b", "b"], "go_id": ["GO:0000002", "GO:0000004", "GO:0000011"]}
    )
    terms = sc.term_statistics(references, ontology)
    frame, partitions = sc.features(raw_rows(), ontology, terms)
    assert partitions == ["M|layer_0", "M|layer_1"]
    assert frame.columns[3:] == sc.feature_names(partitions, aligned=True)
    row = {r["go_id"]: r for r in frame.iter_rows(named=True)}
    one, four = row["GO:0000001"], row["GO:0000004"]
    assert one["d_min@M|layer_0"] == pytest.approx(0.1)
    assert one["d_mean@M|layer_0"] == pytest.approx(0.2)
    assert one["rank_first@M|layer_0"] == 1 and four["rank_first@M|layer_0"] == 2
    assert one["ri_max@M|layer_0"] == pytest.approx(0.9)
    assert one["votes@M|layer_0"] == 2 and one["vote_fraction@M|layer_0"] == 1.0
    assert one["spread@M|layer_0"] == pytest.approx(0.2)
    assert four["weighted_vote@M|layer_0"] == pytest.approx(0.175 / 0.625)
    assert one["identity_max@M|layer_0"] == 0.5 and four["identity_sw_max@M|layer_0"] == 0.4
    # GO:4 has no support in layer 1: missing distances, zero votes
    assert four["d_min@M|layer_1"] is None and four["votes@M|layer_1"] == 0.0
    assert one["agreement"] == 1.0 and four["agreement"] == 0.5
    # GO:1 is supported by (layer 0, r1: IDA), (layer 0, r2: TAS under GO:4), (layer 1, r1: IDA)
    assert one["evidence_experimental"] == pytest.approx(2 / 3)
    assert one["evidence_curator"] == pytest.approx(1 / 3)
    assert one["term_frequency"] == 1.0 and four["term_frequency"] == 0.5
    assert four["information_content"] == pytest.approx(1.0)
    assert one["aspect_code"] == 0.0 and row["GO:0000011"]["aspect_code"] == 1.0


def test_folds_never_split_a_protein():
    accessions = np.array([f"P{i % 23}" for i in range(500)])
    folds = sc.protein_folds(accessions, 5)
    held = np.concatenate([test for _, test in folds])
    assert sorted(held.tolist()) == list(range(500))  # every row held out exactly once
    for train, test in folds:
        assert not set(accessions[train]) & set(accessions[test])
    with pytest.raises(sc.ScorerError, match="too few"):
        sc.protein_folds(accessions[:3], 5)


def test_a_model_for_other_partitions_or_features_is_refused(ontology, tmp_path):
    terms = sc.term_statistics(pl.DataFrame({"protein_id": ["a"], "go_id": ["GO:0000002"]}), ontology)
    frame, partitions = sc.features(raw_rows(), ontology, terms)
    names = frame.columns[3:]
    model = sc.Scorer(models=[], features=names, partitions=["M|layer_0", "N|layer_3"], terms=terms,
                      versions={}, training_hashes={})  # fmt: skip
    with pytest.raises(
        sc.ScorerError, match=r"missing: \['N\|layer_3'\], not in the model: \['M\|layer_1'\]"
    ):
        model.predict(raw_rows(), ontology)
    model.partitions = partitions
    unaligned = raw_rows().drop("identity", "similarity", "identity_sw")
    with pytest.raises(sc.ScorerError, match="missing: \\['identity_max@M\\|layer_0'"):
        model.predict(unaligned, ontology)
    model.check(partitions, list(names))  # made for this lookup: accepted
    with pytest.raises(
        sc.ScorerError,
        match=r"trained on neighbours searched over all references, the lookup searched per aspect",
    ):
        model.predict(raw_rows(), ontology, per_aspect=True)
    model.per_aspect = True
    with pytest.raises(
        sc.ScorerError, match=r"searched per aspect \(lookup.per_aspect: true\), the lookup searched over all"
    ):
        model.predict(raw_rows(), ontology)
    (tmp_path / "junk.model").write_bytes(b"not a pickle")
    with pytest.raises(sc.ScorerError, match=r"junk\.model: not a scoring model"):
        sc.load_scorer(tmp_path / "junk.model")


def _labelled_rows(n: int = 30) -> tuple[pl.DataFrame, pl.DataFrame]:
    """n queries, two neighbours each; the near one's term is the query's true term."""
    rng = np.random.default_rng(1)
    rows, truth = [], []
    terms = ["GO:0000002", "GO:0000004", "GO:0000011", "GO:0000020"]
    for i in range(n):
        near, far = terms[i % 4], terms[(i + 1) % 4]
        d = float(rng.uniform(0.05, 0.3))
        rows.append((f"Q{i}", "M", 0, 1 + i, near, d, 0.6, 0.7, 0.8, "IDA"))
        rows.append((f"Q{i}", "M", 0, 100 + i, far, d + 0.2, 0.2, 0.3, 0.4, "TAS"))
        truth.append((f"Q{i}", near))
    names = raw_rows().columns[:-1]
    raw = pl.DataFrame(rows, schema=names, orient="row").with_columns(pl.col("layer_index").cast(pl.Int64))
    raw = raw.with_columns((1 - pl.col("distance")).alias("reliability_index"))
    return raw, pl.DataFrame(truth, schema=["accession", "go_id"], orient="row")


def test_trained_model_scores_predictions_tsv(ontology, tmp_path, caplog):
    from fantasia_assets.core.scoring import ScoringSettings, run_predictions

    raw, truth = _labelled_rows()
    terms = sc.term_statistics(truth.rename({"accession": "protein_id"}), ontology)
    frame, partitions = sc.features(raw, ontology, terms)
    y = sc.labels(frame, truth, ontology)
    assert y.sum() > 0 and y.sum() < len(y)
    model = sc.fit(frame, y, partitions, terms, {"truth.gaf": "abc"}, n_folds=3)
    path = sc.save_scorer(tmp_path / "model.pkl", model)
    loaded = sc.load_scorer(path)
    assert loaded.partitions == ["M|layer_0"] and loaded.features == frame.columns[3:]
    assert set(loaded.versions) == {"lightgbm", "scikit-learn", "polars"}
    assert loaded.training_hashes == {"truth.gaf": "abc"}
    written = run_predictions(tmp_path, raw, ScoringSettings(ontology=ontology.source, model=path), 4)
    predictions = pl.read_csv(written["predictions"], separator="\t")
    assert predictions.columns == ["accession", "go_id", "aspect", "score"]
    assert_consistent(predictions, ontology)
    assert run_predictions(tmp_path / "none", raw, ScoringSettings(), 4) == {}
    assert "scoring.ontology is not set" in caplog.text
