"""Digests of vector rows: the incremental state's proof that a reference's stored (float16) or a
query's searched (float32) vector is the one it was computed on (`incremental`).

Rows are read a block at a time, and each block of a memory-mapped reference cache is unmapped
once read (`resident.release_rows`), so digesting a million references never holds the map
resident beside the search's operands."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl

from .resident import release_rows


def row_digest(row: np.ndarray) -> bytes:
    """The 16-byte BLAKE2b digest of one row's bytes (its dtype and values, exactly)."""
    return hashlib.blake2b(row.tobytes(), digest_size=16).digest()


def row_digests(vectors: np.ndarray, block: int = 8192) -> list[bytes]:
    """A 16-byte BLAKE2b digest of each row's bytes (its dtype and values, exactly), a block at a
    time, each block of a memory map unmapped once digested (`resident.release_rows`)."""
    digests = []
    for start in range(0, len(vectors), block):
        rows = np.ascontiguousarray(vectors[start : start + block])
        digests += [row_digest(row) for row in rows]
        release_rows(vectors, start, start + block)
    return digests


def carried_digests(
    stored: pl.DataFrame,
    previous_ids: np.ndarray,
    previous: np.ndarray,
    reference_ids: np.ndarray,
    vectors: np.ndarray,
    block: int = 8192,
) -> list[bytes] | None:
    """`row_digests(vectors)`, reusing the stored digest of each row whose bytes equal its row in
    `previous`, the matrix the `stored` digests (sequence_id, digest) were computed on; None when
    `previous` cannot be that matrix (other ids, dtype or width), and the caller digests all rows.

    Comparing bytes costs a tenth of digesting them, and only the rows that differ (added or
    changed references) are digested. The caller vouches that `previous` holds the rows the
    stored digests were taken of (the reference cache file of the state's fingerprint)."""
    stored_ids = stored["sequence_id"].to_numpy()
    if (
        not np.array_equal(previous_ids, stored_ids)
        or previous.dtype != vectors.dtype
        or previous.shape[1:] != vectors.shape[1:]
        or len(previous) != len(stored_ids)
    ):
        return None
    ids = np.asarray(reference_ids, dtype=np.int64)
    _, at_new, at_old = np.intersect1d(ids, stored_ids, assume_unique=True, return_indices=True)
    same = np.zeros(len(ids), dtype=bool)
    for start in range(0, len(at_new), block):
        new_rows = _take(vectors, at_new[start : start + block])
        old_rows = _take(previous, at_old[start : start + block])
        # bytes, not values: -0.0 == 0.0 and NaN != NaN as numbers, and the digest is of bytes
        same[at_new[start : start + block]] = (_as_words(new_rows) == _as_words(old_rows)).all(axis=1)
        for array, at in (
            (vectors, at_new[start : start + block]),
            (previous, at_old[start : start + block]),
        ):
            release_rows(array, int(at.min()), int(at.max()) + 1)
    digests = np.empty(len(ids), dtype=object)  # the bytes objects themselves, placed without a loop
    carried = same[at_new]
    digests[at_new[carried]] = stored["digest"].to_numpy()[at_old[carried]]
    fresh = np.flatnonzero(~same)
    digests[fresh] = _objects(row_digests(_take(vectors, fresh)))
    return digests.tolist()


def _objects(values: list) -> np.ndarray:
    """`values` as a 1-d object array (numpy would make a 2-d one of equal-length bytes)."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _take(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`array[rows]`, a slice (a view, not copied) when the rows run contiguously (a memory map
    read in order)."""
    if len(rows) and rows[-1] - rows[0] + 1 == len(rows):
        return np.ascontiguousarray(array[rows[0] : rows[-1] + 1])  # a view of a C-ordered array
    return np.ascontiguousarray(array[rows])


def _as_words(rows: np.ndarray) -> np.ndarray:
    """Each row's bytes as the widest unsigned integers that tile it: equal words are equal
    bytes, and comparing 8-byte words is several times faster than comparing bytes."""
    size = rows.dtype.itemsize * int(np.prod(rows.shape[1:], dtype=np.int64))
    word = next(w for w in (8, 4, 2, 1) if size % w == 0)
    return rows.reshape(len(rows), -1).view(np.dtype(f"u{word}"))
