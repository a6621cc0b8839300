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
byte for byte from the previous outputs. An accession's inputs changed when its hits rows
differ (searched, merged, renumbered), when a neighbour's annotation rows changed, when its
shard file name changed, or when its previous shard is not the file the state recorded. Query
and reference sequences are covered by the query digest and by sequence ids (a sequence id
names one sequence: the reference tables are keyed by the sequence's hash).

This module is pure: frames, bytes and paths in, frames and bytes out.
"""

from __future__ import annotations

import io
import itertools
import os
import stat
from collections.abc import Iterable

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
    when the two cannot be joined exactly (other columns or types)."""
    kept = old.filter(~pl.col("accession").is_in(list(drop)))
    if new.height == 0:
        return kept
    if kept.height == 0:
        return new
    if kept.schema != new.schema:
        return None
    return pl.concat([kept, new]).sort("accession", maintain_order=True).rechunk()


def _blocks(body: bytes, separator: str, header: bool) -> tuple[int, list[str], list[int]] | None:
    """(header end, accession of each run of lines, line-run byte boundaries) of a CSV/TSV whose
    first field is the accession; None when its lines are not one record each or not sorted
    by accession with each accession's lines together."""
    data = np.frombuffer(body, dtype=np.uint8)
    ends = np.flatnonzero(data == 10) + 1
    if len(body) and (len(ends) == 0 or ends[-1] != len(body)):
        return None
    start = int(ends[0]) if header and len(ends) else 0
    lines = ends[1:] if header else ends
    if len(lines) == 0:
        return start, [], [start]
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
    lengths = runs.struct.field("len").to_numpy()
    accessions = runs.struct.field("value").to_list()
    if any(a >= b for a, b in itertools.pairwise(accessions)):
        return None  # not sorted by accession, or an accession in two places
    bounds = [start, *lines[np.cumsum(lengths) - 1].tolist()]
    return start, accessions, bounds


def splice_lines(
    old: bytes, new: bytes, drop: Iterable[str], separator: str = ",", header: bool = True
) -> bytes | None:
    """`old` without the lines of the accessions in `drop`, with `new`'s lines (accessions in
    `drop` only) in accession order: what writing every accession's lines at once gives.
    None when the files cannot be spliced exactly (different headers, lines out of order, or
    `new` naming an accession outside `drop`)."""
    drop = set(drop)
    parsed_old, parsed_new = _blocks(old, separator, header), _blocks(new, separator, header)
    if parsed_old is None or parsed_new is None:
        return None
    old_start, old_names, old_bounds = parsed_old
    new_start, new_names, new_bounds = parsed_new
    if header and old[:old_start] != new[:new_start]:
        return None
    if not set(new_names) <= drop:
        return None
    pieces = [
        (name, 0, old_bounds[i], old_bounds[i + 1]) for i, name in enumerate(old_names) if name not in drop
    ]
    pieces += [(name, 1, new_bounds[i], new_bounds[i + 1]) for i, name in enumerate(new_names)]
    pieces.sort()
    sources = (memoryview(old), memoryview(new))
    head = [old[:old_start]] if header else []
    return b"".join([*head, *(sources[s][a:b] for _, s, a, b in pieces)])
