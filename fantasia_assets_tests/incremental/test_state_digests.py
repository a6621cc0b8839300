"""A full search's state digests its queries from the vectors the search read (kept on its
`SearchOutcome`), in a thread while the outputs are written: the same state as digesting the
vectors read again from the query file, as before."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from fantasia_assets import incremental_run
from fantasia_assets_tests.incremental.test_reruns import REFS, _config, _load, _run

STATE = Path("state/NEAR/layer_0")


def test_searched_vectors_give_the_state_of_vectors_read_again(engine, tmp_path, monkeypatch):
    _load(engine, REFS)
    kept = _config(tmp_path / "kept")
    assert _run(kept, engine)[1].kind == "full"
    digest = incremental_run._full_digests
    seen = []

    def read_again(queries, partition, outcome, metric, references):
        seen.append(outcome.query_vectors is not None)  # the search kept them
        outcome.query_vectors = outcome.query_rows = None
        return digest(queries, partition, outcome, metric, references)

    monkeypatch.setattr(incremental_run, "_full_digests", read_again)
    again = _config(tmp_path / "again")
    assert _run(again, engine)[1].kind == "full" and seen == [True]
    for name in ("queries.parquet", "references.parquet", "neighbours.parquet"):
        first = pl.read_parquet(Path(kept["experiment_path"]) / STATE / name)
        second = pl.read_parquet(Path(again["experiment_path"]) / STATE / name)
        assert first.height and first.equals(second), name
