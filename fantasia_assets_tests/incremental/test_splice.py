"""Line-level splicing of sorted outputs: the result equals writing every accession's lines at once."""

from __future__ import annotations

import numpy as np
import polars as pl

from fantasia_assets.core import exports
from fantasia_assets.core.incremental_outputs import (
    LineIndex,
    annotation_digests,
    changed_hits,
    line_index,
    splice_indexed,
    splice_raw,
    splice_raw_sorting,
)


def _csv(frame: pl.DataFrame, header: bool = True, separator: str = ",") -> bytes:
    return exports.csv_bytes(frame, 4, header=header, separator=separator)


def splice_lines(old: bytes, new: bytes, drop, separator: str = ",", header: bool = True) -> bytes | None:
    """`splice_indexed` of two files' bytes, the old one's index taken from its bytes."""
    old_index = line_index(old, separator, header)
    if old_index is None:
        return None
    spliced = splice_indexed(old, old_index, new, drop, separator, header)
    return None if spliced is None else b"".join(spliced[0])


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


def test_splice_raw_gathers_what_sorting_gives():
    """The gather of whole runs equals filtering and sorting every row (the plain way), for random
    rows, rebuilt accessions in any order, an accession rebuilt but not dropped (kept rows first,
    as the stable sort puts them), and rows that are not sorted (the plain way itself)."""
    rng = np.random.default_rng(7)
    names = sorted({f"Q{i}" for i in rng.integers(0, 400, 300)} | {"", "B\tt", 'B,"x"', "é", "Z\n"})
    for trial in range(30):
        sizes = rng.integers(1, 5, len(names))
        old = pl.DataFrame({"accession": np.repeat(names, sizes).tolist(), "v": np.arange(int(sizes.sum()))})
        drop = set(rng.choice(names, int(rng.integers(0, len(names))), replace=False).tolist())
        rebuilt = sorted(drop)[: int(rng.integers(0, len(drop) + 1))]
        if trial % 3 == 0 and len(names) > len(drop):
            rebuilt.append(sorted(set(names) - drop)[0])  # outside drop: after the kept rows
        counts = rng.integers(1, 4, len(rebuilt))
        new = pl.DataFrame(
            {"accession": np.repeat(rebuilt, counts).tolist(), "v": -np.arange(int(counts.sum())) - 1},
            schema=old.schema,
        ).sample(fraction=1.0, shuffle=True, seed=trial)
        assert splice_raw(old, new, drop).equals(splice_raw_sorting(old, new, drop))
        shuffled = old.sample(fraction=1.0, shuffle=True, seed=trial)
        assert splice_raw(shuffled, new, drop).equals(splice_raw_sorting(shuffled, new, drop))
    assert splice_raw(old, new.with_columns(pl.col("v").cast(pl.Float64)), set(names[:1])) is None


def _same(left: LineIndex, right: LineIndex) -> bool:
    return (
        left.accessions.tolist() == right.accessions.tolist()
        and left.bounds.tolist() == right.bounds.tolist()
        and left.lines.tolist() == right.lines.tolist()
        and left.header_lines == right.header_lines
    )


def test_spliced_index_is_the_index_of_the_spliced_bytes():
    """The index a splice returns (what the state stores) equals parsing its result; random
    drops, rebuilt subsets and accessions that only one side has."""
    rng = np.random.default_rng(7)
    names = [f"Q{i:03d}" for i in range(40)] + ['Q,"quoted"', "Q\ttab", "Q\x00nul"]
    for case in range(60):
        header, separator = (True, ",") if case % 2 else (False, "\t")
        chosen = sorted(rng.choice(names, int(rng.integers(0, 30)), replace=False).tolist())
        counts = rng.integers(1, 4, len(chosen))
        rows = pl.DataFrame(
            {"accession": np.repeat(chosen, counts).tolist(), "score": rng.random(int(counts.sum()))},
            schema={"accession": pl.String, "score": pl.Float64},
        ).sort("accession", maintain_order=True)
        drop = set(rng.choice(names, int(rng.integers(0, 15)), replace=False).tolist())
        rebuilt = pl.DataFrame(
            {"accession": sorted(d for d in drop if rng.random() < 0.6), "score": 0.5},
            schema={"accession": pl.String, "score": pl.Float64},
        )
        old, new = _csv(rows, header, separator), _csv(rebuilt, header, separator)
        old_index = line_index(old, separator, header)
        assert old_index is not None and old_index.fits(old)
        assert _same(LineIndex.from_frame(old_index.frame("f")), old_index)
        pieces, index = splice_indexed(old, old_index, new, drop, separator, header)
        spliced = b"".join(pieces)
        assert spliced == splice_lines(old, new, drop, separator, header)
        expected = pl.concat([rows.filter(~pl.col("accession").is_in(list(drop))), rebuilt]).sort(
            "accession", maintain_order=True
        )
        assert spliced == _csv(expected, header, separator)
        assert _same(index, line_index(spliced, separator, header)) and index.fits(spliced)
        assert index.rows == expected.height


def test_an_index_does_not_fit_other_bytes():
    body = _csv(FULL)
    index = line_index(body)
    assert index.fits(body)
    assert not index.fits(body + b"x,GO:1,0.5\n")  # longer
    assert not index.fits(body.replace(b"A,GO:1", b"A,GO:12", 1)[:-1])  # a line end moved
    assert not index.fits(body.replace(b"\n", b"", 1) + b"\n")  # the header ends elsewhere
    assert LineIndex.from_frame(index.frame("f").slice(1)) is None  # no header row


def test_digests_of_some_references_are_those_of_the_whole_table():
    """A rerun digests only the neighbours' annotation rows: each sequence's digest is the one
    the whole table gives it, whatever other sequences' rows are left out."""
    annotations = pl.DataFrame(
        {
            "sequence_id": [3, 1, 3, 2, 1, 3],
            "go_id": ["GO:1", "GO:2", "GO:3", "GO:1", "GO:1", "GO:1"],
            "evidence_code": ["EXP", "IEA", "EXP", "EXP", "TAS", "IEA"],
        }
    )
    whole = annotation_digests(annotations)
    some = annotation_digests(annotations.filter(pl.col("sequence_id").is_in([1, 3])))
    assert some.equals(whole.filter(pl.col("sequence_id").is_in([1, 3])))
    reordered = annotations.filter(pl.col("sequence_id") == 3).reverse()  # row order is part of it
    assert annotation_digests(reordered)["h1"][0] != whole.filter(pl.col("sequence_id") == 3)["h1"][0]


def test_an_index_whose_first_accession_does_not_start_a_headerless_file_does_not_fit():
    body = _csv(FULL, header=False, separator="\t")
    index = line_index(body, "\t", False)
    moved = LineIndex(index.accessions[1:], index.bounds[1:], index.lines[1:], 0)
    assert index.fits(body) and not moved.fits(body)
