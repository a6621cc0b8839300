"""sequences.fasta of a rerun from the previous file: the records still named are kept byte for
byte, and only the new references' records are built (their sequences alone fetched).

sequences.fasta (`writers.write_sequences`) holds one record per unique query sequence
(``>Q{query_idx}``, in query_idx order), then one per reference sequence the raw rows name
(``>R{sequence_id}``, ascending id). `exports.fasta_bytes` of several records is the
concatenation of each record's own, so a record's bytes depend on its identifier and sequence
alone. Hence:

- the query records are the previous file's first bytes when the query file is the same (its
  content digest): they are built from its sequences alone;
- a reference record is the previous file's bytes for as long as its sequence id names the same
  sequence, which it does for good: the reference tables are keyed by the sequence's hash (the
  premise `incremental_outputs` rests on for the raw rows' sequences too);

so a rerun keeps the records of the references still named, drops the others, and puts the new
ones' records in their place by id. The state keeps the length of the query records and each
reference record's id and byte length (`layout_frame`); `splice` checks that the previous
file is laid out as they say (its size, and every reference record's header at its offset:
the records then span exactly from one header to the next) and declines otherwise.

This module is pure: bytes, arrays and frames in and out.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from . import exports

LAYOUT = {"sequence_id": pl.Int64, "bytes": pl.Int64}


def query_records(sequences: Sequence[str]) -> bytes:
    """The query records (``>Q{query_idx}``) of the unique query sequences, in query_idx order."""
    return exports.fasta_bytes([(f"Q{i}", s) for i, s in enumerate(sequences)])


def reference_records(references: Mapping[int, str]) -> tuple[list[bytes], np.ndarray]:
    """Each reference's record (``>R{sequence_id}``), ascending by id, and the ids.

    One `fasta_bytes` call per record: the same bytes, concatenated, as one call for all (each
    record ends in its own line break), at the same cost, and every record's length known."""
    ids = np.array(sorted(references), dtype=np.int64)
    return [exports.fasta_bytes([(f"R{i}", references[i])]) for i in ids.tolist()], ids


def layout_frame(ids: np.ndarray, lengths: np.ndarray) -> pl.DataFrame:
    """The state's record of the reference records: id and byte length, in file order."""
    return pl.DataFrame(
        {"sequence_id": np.asarray(ids, dtype=np.int64), "bytes": np.asarray(lengths, dtype=np.int64)},
        schema=LAYOUT,
    )


def read_layout(frame: pl.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(ids, byte lengths) of a `layout_frame`; ValueError when it is not one."""
    if dict(frame.schema) != LAYOUT or frame.null_count().sum_horizontal().item():
        raise ValueError(f"columns {dict(frame.schema)}")
    ids, lengths = frame["sequence_id"].to_numpy(), frame["bytes"].to_numpy()
    if len(ids) > 1 and not (np.diff(ids) > 0).all():
        raise ValueError("ids not strictly ascending")
    if (lengths < 1).any():
        raise ValueError("a record length below 1")
    return ids, lengths


def splice(
    previous: bytes,
    query_bytes: int,
    ids: np.ndarray,
    lengths: np.ndarray,
    queries: bytes | None,
    wanted: np.ndarray,
    fetched: Mapping[int, str],
) -> tuple[list[bytes | memoryview], np.ndarray, np.ndarray] | None:
    """The new file as chunks, with its reference ids and record lengths; None when `previous` is
    not laid out as (`query_bytes`, `ids`, `lengths`) say.

    `queries`: the new query records, or None to keep the previous ones (the same query file).
    `wanted`: every reference id the raw rows name, ascending and unique. `fetched`: the
    sequences of the wanted ids that `previous` lacks; an id found in neither is left out, as
    the whole file's writer leaves out an id whose sequence is not found."""
    if query_bytes < 0 or query_bytes + int(lengths.sum()) != len(previous):
        return None
    offsets = query_bytes + np.cumsum(lengths) - lengths
    for sequence_id, offset in zip(ids.tolist(), offsets.tolist(), strict=True):
        if not previous.startswith(b">R%d\n" % sequence_id, offset):
            return None
    wanted = np.asarray(wanted, dtype=np.int64)
    at = np.searchsorted(ids, wanted)
    kept = at < len(ids)
    kept[kept] = ids[at[kept]] == wanted[kept]
    found = kept | np.isin(wanted, np.fromiter(fetched, dtype=np.int64, count=len(fetched)))
    wanted, at, kept = wanted[found], at[found], kept[found]
    old = np.where(kept, at, -1)
    # runs of records kept in a row from the previous file are copied as one slice
    starts = np.flatnonzero(~kept | np.concatenate([[True], (old[1:] != old[:-1] + 1) | ~kept[:-1]])).tolist()
    view = memoryview(previous)
    chunks: list[bytes | memoryview] = [queries if queries is not None else view[:query_bytes]]
    new_lengths = np.zeros(len(wanted), dtype=np.int64)
    new_lengths[kept] = lengths[at[kept]]
    for start, stop in itertools.pairwise([*starts, len(wanted)]):
        if kept[start]:
            first, last = old[start], old[stop - 1]
            chunks.append(view[offsets[first] : offsets[last] + lengths[last]])
        else:
            record = exports.fasta_bytes([(f"R{int(wanted[start])}", fetched[int(wanted[start])])])
            new_lengths[start] = len(record)
            chunks.append(record)
    return chunks, wanted, new_lengths
