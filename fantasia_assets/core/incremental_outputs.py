"""Incremental outputs: which queries' outputs a rerun must rebuild, and splicing the rest verbatim.

Every output below the neighbours is local to one query accession:

- a raw row is one (neighbour × annotation) of one accession: its hits, the annotation rows of
  its neighbours' sequences, the query's and the references' sequences, and the partition's
  settings;
- a raw shard holds one accession's raw rows;
- a TopGO line is the best RI of one (accession, GO term) in one partition, the ensemble's over
  all partitions;
- a summary.csv row groups one (accession, GO term) over the partitions; its columns depend on
  which (model, layer) pairs have raw rows at all (checked: a spliced file must keep the
  header a rebuilt subset has), `count` divides by k, every other value is computed from the
  term's own rows. Nothing is normalised over the run, and no statistic spans accessions.

Every such file is sorted by accession, each accession's lines are contiguous, and a line's
bytes depend on its own values only (fixed float precision, per-field quoting). So a rerun
rebuilds the outputs of the accessions whose inputs changed — with the same public functions a
full run calls, on that subset — and splices them between the other accessions' lines, taken
byte for byte from the previous outputs. Where those lines lie in a previous file is its line
index (`LineIndex`: each accession's byte range and line count), taken once when the file is
written and stored with the state, so a splice parses only the rebuilt lines.

An accession's inputs changed when it was searched anew (added, or its query digest changed:
its vector or its sequence, which a model may leave with the same vector, for instance past its
length cut or in residues it maps to one token), when its hits rows differ (merged,
renumbered), when a neighbour's annotation rows changed, when its shard file name changed, or
when its previous shard is not the file the state recorded. Reference sequences are covered by
sequence ids (a sequence id names one sequence: the reference tables are keyed by the
sequence's hash).

This module is pure: frames, bytes and paths in, frames and bytes out.
"""

from __future__ import annotations

import io
import os
import stat
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import polars as pl

from .transfer import HIT_SCHEMA

ANNOTATION_DIGESTS = {"sequence_id": pl.Int64, "h1": pl.UInt64, "h2": pl.UInt64}
SHARDS = {"accession": pl.String, "file": pl.String, "size": pl.Int64, "mtime_ns": pl.Int64, "ino": pl.Int64}


def signature(path: os.PathLike | str) -> list[int] | None:
    """(size, mtime_ns, inode) of a regular file, or None: a file rewritten or edited since
    changes at least one of them (a rename into place, or a hard link, changes none)."""
    try:
        status = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISREG(status.st_mode):
        return None
    return [status.st_size, status.st_mtime_ns, status.st_ino]


def annotation_digests(annotations: pl.DataFrame) -> pl.DataFrame:
    """Per reference sequence, a 128-bit digest of its annotation rows in table order (all
    columns): two sequences' transferred rows are the same exactly when their digests are."""
    columns = [c for c in annotations.columns if c != "sequence_id"]
    rows = annotations.select(
        "sequence_id",
        pl.struct(columns).hash(11).alias("r1"),
        pl.struct(columns).hash(53).alias("r2"),
    )
    return (
        rows.group_by("sequence_id", maintain_order=True)
        .agg(pl.col("r1"), pl.col("r2"))
        .select(
            pl.col("sequence_id").cast(pl.Int64),
            pl.col("r1").hash(101).alias("h1"),
            pl.col("r2").hash(113).alias("h2"),
        )
        .sort("sequence_id")
    )


def changed_sequences(old: pl.DataFrame, new: pl.DataFrame) -> np.ndarray:
    """Sequence ids whose annotation digests differ, or that gained or lost every annotation."""
    joined = old.join(new, on="sequence_id", how="full", coalesce=True, suffix="_new")
    differ = (
        pl.col("h1").is_null()
        | pl.col("h1_new").is_null()
        | (pl.col("h1") != pl.col("h1_new"))
        | (pl.col("h2") != pl.col("h2_new"))
    )
    return joined.filter(differ)["sequence_id"].to_numpy()


def changed_hits(old: pl.DataFrame, new: pl.DataFrame) -> set[str]:
    """Accessions whose hit rows (query_idx, rank, neighbour, distance) differ between two hits
    tables, including those present in one only."""
    columns = list(HIT_SCHEMA)
    left, right = old.select(columns), new.select(columns)
    gone = left.join(right, on=columns, how="anti", nulls_equal=True)["accession"]
    came = right.join(left, on=columns, how="anti", nulls_equal=True)["accession"]
    return set(gone.unique().to_list()) | set(came.unique().to_list())


def splice_raw(old: pl.DataFrame, new: pl.DataFrame, drop: set[str]) -> pl.DataFrame | None:
    """The previous raw rows but those of `drop`, with `new` (rebuilt rows of accessions in
    `drop`) in their place; accession order, each accession's rows as they were built. None
    when the two cannot be joined exactly (other columns or types).

    The result is `splice_raw_sorting`'s, the kept rows and `new` concatenated and sorted
    stably by accession, but `old` is already in that order (raw rows are written sorted by
    accession), so only `new` is sorted, and the result is one gather of whole accessions' runs:
    a sort and a filter of every row, strings compared, cost several times more."""
    runs = _runs(old["accession"])
    if runs is None:  # not sorted by accession (never written so): the plain way
        return splice_raw_sorting(old, new, drop)
    names, starts, lengths = runs
    keep = np.array([name not in drop for name in names.tolist()], dtype=bool)
    if new.height == 0 or not keep.any():
        return splice_raw_sorting(old, new, drop)  # a filter, or `new` itself
    if old.schema != new.schema:
        return None
    new = new.sort("accession", maintain_order=True)
    new_names, new_starts, new_lengths = _runs(new["accession"])
    kept_names = names[keep]
    # new run j goes after every kept run whose accession is <= its own (the stable sort keeps
    # kept rows, concatenated first, before new ones of an equal accession)
    at = np.searchsorted(kept_names, new_names, side="right")
    order = np.argsort(np.concatenate([2 * np.arange(len(kept_names)) + 1, 2 * at]), kind="stable")
    first = np.concatenate([starts[keep], old.height + new_starts])[order]
    length = np.concatenate([lengths[keep], new_lengths])[order]
    offsets = np.cumsum(length) - length
    rows = np.arange(int(length.sum()), dtype=np.int64) + np.repeat(first - offsets, length)
    return pl.concat([old, new], rechunk=False)[rows].rechunk()


def splice_raw_sorting(old: pl.DataFrame, new: pl.DataFrame, drop: set[str]) -> pl.DataFrame | None:
    """`splice_raw` the straightforward way: the kept rows and `new`, sorted stably by accession."""
    kept = old.filter(~pl.col("accession").is_in(list(drop)))
    if new.height == 0:
        return kept
    if kept.height == 0:
        return new
    if kept.schema != new.schema:
        return None
    return pl.concat([kept, new]).sort("accession", maintain_order=True).rechunk()


def _runs(accessions: pl.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(accession, first row, row count) of each run of equal accessions, or None when the
    runs are not in strictly increasing order (the rows are not sorted by accession)."""
    if accessions.null_count():
        return None
    runs = accessions.rle()
    names = _names(runs.struct.field("value").to_list())
    if not _increasing(names):
        return None
    lengths = runs.struct.field("len").to_numpy().astype(np.int64)
    return names, np.cumsum(lengths) - lengths, lengths


# A file's line index as state stores it: one row per file with a null accession (the header's
# end and line count), then one per accession (where its lines end, how many there are).
LINES = {"file": pl.String, "accession": pl.String, "end": pl.Int64, "lines": pl.Int64}


@dataclass(frozen=True)
class LineIndex:
    """Where each accession's lines lie in a CSV/TSV sorted by accession (its first field):
    bytes [bounds[i], bounds[i + 1]) are the `lines[i]` lines of `accessions[i]`, and
    [0, bounds[0]) the header's `header_lines` lines."""

    accessions: np.ndarray  # Python strings (object), strictly increasing
    bounds: np.ndarray  # int64, len(accessions) + 1
    lines: np.ndarray  # int64, one count per accession
    header_lines: int

    @property
    def size(self) -> int:
        return int(self.bounds[-1])

    @property
    def rows(self) -> int:
        return int(self.lines.sum())

    def fits(self, body: bytes) -> bool:
        """Whether `body` can be the file this index was taken of: as long, and a line ends
        at every accession's end (a cheap guard; the recorded digest proves the bytes)."""
        bounds = self.bounds
        if len(body) != self.size or len(bounds) != len(self.accessions) + 1 or bounds[0] < 0:
            return False
        if len(self.lines) != len(self.accessions) or (self.lines < 1).any() or (np.diff(bounds) < 1).any():
            return False
        data = np.frombuffer(body, dtype=np.uint8)
        head = data[: bounds[0]]
        if int((head == 10).sum()) != self.header_lines or (
            head[-1] != 10 if len(head) else self.header_lines
        ):
            return False  # a header is its lines, whole; without one the first accession starts the file
        return bool((data[bounds[1:] - 1] == 10).all()) and _increasing(self.accessions)

    def frame(self, file: str) -> pl.DataFrame:
        """This index as `LINES` rows for `file`."""
        return pl.DataFrame(
            {
                "file": [file] * (len(self.accessions) + 1),
                "accession": [None, *self.accessions.tolist()],
                "end": self.bounds,
                "lines": [self.header_lines, *self.lines.tolist()],
            },
            schema=LINES,
        )

    @classmethod
    def from_frame(cls, rows: pl.DataFrame) -> LineIndex | None:
        """The index of one file's `LINES` rows (as `frame` wrote them); None when they are not."""
        if rows.height == 0 or rows["accession"][0] is not None or rows["accession"].null_count() != 1:
            return None
        accessions = _names(rows["accession"][1:].to_list())
        lines = rows["lines"].to_numpy()
        return cls(
            accessions, rows["end"].to_numpy().astype(np.int64), lines[1:].astype(np.int64), int(lines[0])
        )


def _names(values: list[str]) -> np.ndarray:
    """Accessions as an array of Python strings (numpy's fixed-width strings drop trailing NULs)."""
    names = np.empty(len(values), dtype=object)
    names[:] = values
    return names


def _increasing(names: np.ndarray) -> bool:
    return bool((names[1:] > names[:-1]).all()) if len(names) > 1 else True


def line_index(body: bytes, separator: str = ",", header: bool = True) -> LineIndex | None:
    """The line index of a CSV/TSV whose first field is the accession; None when its lines are
    not one record each, or not sorted by accession with each accession's lines together."""
    data = np.frombuffer(body, dtype=np.uint8)
    ends = np.flatnonzero(data == 10) + 1
    if len(body) and (len(ends) == 0 or ends[-1] != len(body)):
        return None
    start = int(ends[0]) if header and len(ends) else 0
    lines = ends[1:] if header and len(ends) else ends
    header_lines = 1 if header and len(ends) else 0
    if len(lines) == 0:
        return LineIndex(
            np.array([], dtype=object), np.array([start], dtype=np.int64), np.zeros(0, np.int64), header_lines
        )
    first = pl.read_csv(
        io.BytesIO(body[start:]),
        has_header=False,
        separator=separator,
        columns=[0],
        infer_schema=False,
        quote_char='"',
    ).to_series()
    if len(first) != len(lines) or first.null_count():
        return None
    runs = first.rle()
    lengths = runs.struct.field("len").to_numpy().astype(np.int64)
    accessions = _names(runs.struct.field("value").to_list())
    if not _increasing(accessions):
        return None  # not sorted by accession, or an accession in two places
    bounds = np.concatenate([[start], lines[np.cumsum(lengths) - 1]]).astype(np.int64)
    return LineIndex(accessions, bounds, lengths, header_lines)


def splice_indexed(
    old: bytes,
    old_index: LineIndex,
    new: bytes,
    drop: Iterable[str],
    separator: str = ",",
    header: bool = True,
) -> tuple[list[memoryview], LineIndex] | None:
    """`old` (whose index is `old_index`) without the lines of the accessions in `drop`, with
    `new`'s lines (accessions in `drop` only) in accession order — what writing every
    accession's lines at once gives — as byte ranges of the two, and its index. None when the
    files cannot be spliced exactly (different headers, lines out of order, `new` naming an
    accession outside `drop`). Only `new` is parsed."""
    new_index = line_index(new, separator, header)
    if new_index is None:
        return None
    old_start, new_start = int(old_index.bounds[0]) if header else 0, int(new_index.bounds[0])
    if header and old[:old_start] != new[:new_start]:
        return None
    drop = set(drop)
    if not drop.issuperset(new_index.accessions.tolist()):
        return None
    names, count = old_index.accessions, len(old_index.accessions)
    keep = np.array([name not in drop for name in names.tolist()], dtype=bool)
    # new accession j goes before old position at[j] (an equal old accession is dropped)
    at = np.searchsorted(names, new_index.accessions) if count else np.zeros(len(new_index.accessions), int)
    inserted = np.zeros(count + 1, dtype=bool)
    inserted[at] = True
    # runs of kept accessions, cut where a new accession goes in: each one byte range of `old`
    opens = keep & (np.concatenate([[True], ~keep[:-1]]) | inserted[:count])
    closes = keep & np.concatenate([~keep[1:] | inserted[1:count], [True]])
    first, last = np.flatnonzero(opens), np.flatnonzero(closes)
    # pieces in order: a new accession at position p before the old run that starts at p
    order = np.argsort(np.concatenate([2 * first + 1, 2 * at]), kind="stable")
    ranges = np.concatenate(
        [
            np.stack(
                [np.zeros(len(first), np.int64), old_index.bounds[first], old_index.bounds[last + 1]], 1
            ),
            np.stack([np.ones(len(at), np.int64), new_index.bounds[:-1], new_index.bounds[1:]], 1),
        ]
    )[order]
    sources = (memoryview(old), memoryview(new))
    pieces = [memoryview(old)[:old_start]] if header else []
    pieces += [sources[s][a:b] for s, a, b in ranges.tolist()]
    # the result's index: kept and new accessions in the same order, their lengths laid end to end
    kept = np.flatnonzero(keep)
    each = np.argsort(np.concatenate([2 * kept + 1, 2 * at]), kind="stable")
    lengths = np.concatenate([np.diff(old_index.bounds)[kept], np.diff(new_index.bounds)])[each]
    index = LineIndex(
        np.concatenate([names[kept], new_index.accessions])[each],
        np.concatenate([[old_start], old_start + np.cumsum(lengths)]).astype(np.int64),
        np.concatenate([old_index.lines[kept], new_index.lines])[each],
        old_index.header_lines,
    )
    return pieces, index
