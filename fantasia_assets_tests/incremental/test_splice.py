"""Line-level splicing of sorted outputs: the result equals writing every accession's lines at once."""

from __future__ import annotations

import polars as pl

from fantasia_assets.core import exports
from fantasia_assets.core.incremental_outputs import changed_hits, splice_lines, splice_raw


def _csv(frame: pl.DataFrame, header: bool = True, separator: str = ",") -> bytes:
    return exports.csv_bytes(frame, 4, header=header, separator=separator)


FULL = pl.DataFrame(
    {
        "accession": ["A", "A", 'B,"x"', "B\tt", "C", "C", "D"],
        "go_id": ["GO:1", "GO:2", "GO:1", "GO:3", "GO:1", "GO:4", "GO:9"],
        "score": [0.5, 0.25, 1.0, 0.125, 0.75, 0.5, 0.1],
    }
).sort("accession", maintain_order=True)  # byte order: "B\tt" before 'B,"x"', as every writer sorts


def test_splice_equals_the_whole_file_for_quoted_accessions():
    for header, separator in ((True, ","), (False, "\t")):
        old = FULL.with_columns(pl.col("score") * 2)
        drop = {'B,"x"', "C", "E"}
        new = FULL.filter(pl.col("accession").is_in(list(drop)))
        mixed = pl.concat([old.filter(~pl.col("accession").is_in(list(drop))), new]).sort(
            "accession", maintain_order=True
        )
        spliced = splice_lines(
            _csv(old, header, separator), _csv(new, header, separator), drop, separator, header
        )
        assert spliced == _csv(mixed, header, separator)
        # an accession removed with no lines of its own any more
        gone = splice_lines(
            _csv(old, header, separator), _csv(new.head(0), header, separator), {"D"}, separator, header
        )
        assert gone == _csv(old.filter(pl.col("accession") != "D"), header, separator)


def test_splice_refuses_what_it_cannot_prove():
    old = _csv(FULL)
    new = _csv(FULL.filter(pl.col("accession") == "C"))
    assert splice_lines(old, new, {"A"}) is None  # new lines of an accession not dropped
    assert splice_lines(old, _csv(FULL.rename({"score": "other"}).head(1)), {"A"}) is None  # header
    unsorted = _csv(pl.concat([FULL.tail(1), FULL.head(2)]))
    assert splice_lines(unsorted, new, {"C"}) is None


def test_splice_raw_and_changed_hits():
    old = FULL.with_columns(pl.lit(0).alias("n"))
    new = FULL.filter(pl.col("accession") == "C").with_columns(pl.lit(1).alias("n"))
    spliced = splice_raw(old, new, {"C", "D"})
    assert spliced["accession"].to_list() == ["A", "A", "B\tt", 'B,"x"', "C", "C"]
    assert spliced.filter(pl.col("accession") == "C")["n"].to_list() == [1, 1]
    assert splice_raw(old, new.with_columns(pl.col("n").cast(pl.Float64)), {"C"}) is None
    hits = pl.DataFrame(
        {"accession": ["A", "A", "B"], "query_idx": [0, 0, 1], "rank": [0, 1, 0], "ref_idx": [5, 6, 7],
         "distance": [0.1, 0.2, 0.3]},
        schema={"accession": pl.String, "query_idx": pl.Int64, "rank": pl.Int32, "ref_idx": pl.Int64,
                "distance": pl.Float64},
    )  # fmt: skip
    moved = hits.with_columns(
        pl.when(pl.col("accession") == "B").then(2).otherwise(pl.col("query_idx")).alias("query_idx")
    )
    assert changed_hits(hits, moved) == {"B"}
    assert changed_hits(hits, hits.head(2)) == {"B"}
    assert changed_hits(hits, hits) == set()
