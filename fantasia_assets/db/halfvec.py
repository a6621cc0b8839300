"""The PostgreSQL binary COPY format of (int4 sequence_id, halfvec embedding) rows, both ways.

Every row of one model has the same size, so a whole stream is one numpy structured array:
field count, then each field's length and big-endian payload (halfvec: int16 dim, int16
unused, dim × float16). Encoding (the loader) and decoding (the reference fetch) share the
record layout below; no Python object is made per row, even at a million rows.

pgvector-python's codec (`pgvector.HalfVector.to_binary`/`from_binary`) works one vector at a
time; `bench/halfvec_codec.py` measures it against this one (see `encode`'s docstring).
"""

from __future__ import annotations

import numpy as np

from fantasia_assets.core.references import ReferenceSetError

_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_TRAILER = (-1).to_bytes(2, "big", signed=True)


def record_dtype(dim: int) -> np.dtype:
    """One COPY row of (int4, halfvec(dim))."""
    return np.dtype(
        [
            ("nfields", ">i2"),
            ("id_len", ">i4"),
            ("id", ">i4"),
            ("vec_len", ">i4"),
            ("dim", ">i2"),
            ("unused", ">i2"),
            ("values", ">f2", (dim,)),
        ]
    )


def encode(sequence_ids: np.ndarray, vectors: np.ndarray) -> bytes:
    """Binary COPY payload of (sequence_id, halfvec) rows, built in numpy."""
    n, dim = vectors.shape
    rows = np.empty(n, dtype=record_dtype(dim))
    rows["nfields"] = 2
    rows["id_len"] = 4
    rows["id"] = sequence_ids
    rows["vec_len"] = 4 + 2 * dim
    rows["dim"] = dim
    rows["unused"] = 0
    rows["values"] = vectors
    return _HEADER + rows.tobytes() + _TRAILER


def decode(payload: bytes) -> tuple[np.ndarray, np.ndarray]:
    """(int64 sequence ids, C-contiguous float16 matrix) from a binary COPY of (int4, halfvec)."""
    body = memoryview(payload)[len(_HEADER) :]
    if len(body) <= len(_TRAILER):
        return np.empty(0, np.int64), np.empty((0, 0), np.float16)
    dim = int.from_bytes(body[14:16], "big", signed=True)
    record = record_dtype(dim)
    usable = len(body) - len(_TRAILER)
    if usable % record.itemsize:
        raise ReferenceSetError("reference embeddings of one model and layer have different dimensions")
    rows = np.frombuffer(body[:usable], dtype=record)
    odd = np.flatnonzero((rows["nfields"] != 2) | (rows["dim"] != dim))
    if len(odd):
        raise ReferenceSetError(
            f"sequence {int(rows['id'][odd[0]])} has a {int(rows['dim'][odd[0]])}-dim embedding, "
            f"others have {dim}"
        )
    return rows["id"].astype(np.int64), np.ascontiguousarray(rows["values"], dtype=np.float16)
