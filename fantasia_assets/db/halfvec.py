"""The PostgreSQL binary COPY format of (int4 sequence_id, halfvec embedding) rows, both ways.

Every row of one model has the same size, so a whole stream is one numpy structured array:
field count, then each field's length and big-endian payload (halfvec: int16 dim, int16
unused, dim × float16). Encoding (the loader) and decoding (the reference fetch) share the
record layout below; no Python object is made per row, even at a million rows.

pgvector-python's codec (`pgvector.HalfVector.to_binary`/`from_binary`) works one vector at a
time; `bench/halfvec_codec.py` measures it against this one (figures in `encode`'s docstring).
"""

from __future__ import annotations

import numpy as np
from psycopg import sql

from fantasia_assets.core.references import ReferenceSetError

_HEADER = b"PGCOPY\n\xff\r\n\x00" + (0).to_bytes(4, "big") + (0).to_bytes(4, "big")
_TRAILER = (-1).to_bytes(2, "big", signed=True)
_ROW_WORDS = 9  # 16-bit words before the values: field count, id length, id, vector length, dim, unused


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
    """Binary COPY payload of (sequence_id, halfvec) rows, built in numpy.

    Every field of a row starts at an even offset, so the rows are one matrix of 9 + dim
    big-endian 16-bit words, written in place between header and trailer: the vectors go in
    with one byte-swapping copy. Measured with `bench/halfvec_codec.py` (20,000 × 1,024, best
    of 5, on a loaded 2-core machine) against pgvector-python's per-vector
    `HalfVector.to_binary`/`from_binary` with the same record framing: encoding 3.8–4.0 ×
    faster, decoding 5.3–8.4 × faster, the same bytes. pgvector's is far outside 10 %, so
    this codec stays.
    """
    vectors = np.asarray(vectors, dtype=np.float16)
    n, dim = vectors.shape
    stream = np.empty(len(_HEADER) + 2 * n * (_ROW_WORDS + dim) + len(_TRAILER), dtype=np.uint8)
    stream[: len(_HEADER)] = np.frombuffer(_HEADER, dtype=np.uint8)
    stream[len(stream) - len(_TRAILER) :] = np.frombuffer(_TRAILER, dtype=np.uint8)
    # the rows, written in place between header and trailer (one copy of the vectors, no joins)
    words = stream[len(_HEADER) : len(stream) - len(_TRAILER)].view(">u2").reshape(n, _ROW_WORDS + dim)
    words[:, 0] = 2  # field count
    words[:, 1:3] = (0, 4)  # int4 length
    words[:, 3:5] = np.asarray(sequence_ids).astype(">i4").view(">u2").reshape(n, 2)
    words[:, 5:7] = np.array([4 + 2 * dim], dtype=">i4").view(">u2")  # halfvec length
    words[:, 7] = dim
    words[:, 8] = 0  # unused
    words[:, _ROW_WORDS:] = vectors.view(np.uint16)
    return stream.tobytes()


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


# The reference fetch reads a scope's rows packed by the server into groups: one COPY row per
# ≤ 2^GROUP_BITS consecutive sequence ids, holding two bytea fields, the group's int4 ids and
# their halfvecs (pgvector's binary send format: int16 dim, int16 unused, dim × float16), each
# concatenated in ascending id order. One row per vector would cost a Python round trip per
# vector in the driver (12 s for 124,000 rows, 3 × the packed form, on a loaded 2-core machine).
GROUP_BITS = 10

# pgvector's `halfvec_send` writes each value with its own call, byte-swapped: at 124,000 ×
# 1,024 it was 1.6 s of the server's CPU, two thirds of the whole grouped read (0.8 s with the
# stored form), on the critical path of a cold lookup. The stored value already is that layout
# in the server's byte order, and migration 0003 declares `fa_halfvec_bytes`, which hands it over
# as it is, where the migrating role was a superuser (the embedded server's is). A read uses it
# when it exists and its probe value comes back little-endian, else `halfvec_send`. The check
# only reads: a read must take no transaction id (`db.snapshot`).
_NATIVE_FUNCTION = "fa_halfvec_bytes"
_NATIVE_PROBE = b"\x02\x00\x00\x00\x00\x3c\x00\xc0"  # '[1,-2]': dim 2, unused 0, 1.0, -2.0


def native_reads(cursor) -> sql.Composable | None:
    """The stored-form function, schema-qualified, where this session can read halfvecs with it
    (above); None where it must use `halfvec_send`."""
    cursor.execute(
        "SELECT n.nspname FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
        "WHERE p.proname = %s AND p.oid = to_regprocedure(%s)",
        (_NATIVE_FUNCTION, f"{_NATIVE_FUNCTION}(halfvec)"),
    )
    found = cursor.fetchone()
    if found is None:
        return None
    function = sql.Identifier(found[0], _NATIVE_FUNCTION)
    cursor.execute(sql.SQL("SELECT {}('[1,-2]'::halfvec)").format(function))
    return function if bytes(cursor.fetchone()[0]) == _NATIVE_PROBE else None


def grouped_select(rows: sql.Composable, native: sql.Composable | None = None) -> sql.Composable:
    """A SELECT packing the (sequence_id, embedding) rows of `rows` into groups, ascending; the
    vectors in pgvector's send format, or through `native` (`native_reads`) in their stored form."""
    vectors = (
        sql.SQL("{}(embedding)").format(native) if native is not None else sql.SQL("halfvec_send(embedding)")
    )
    return sql.SQL(
        "SELECT string_agg(int4send(sequence_id), ''::bytea ORDER BY sequence_id), "
        "string_agg({vectors}, ''::bytea ORDER BY sequence_id) "
        "FROM ({rows}) AS packed GROUP BY sequence_id >> {bits} ORDER BY sequence_id >> {bits}"
    ).format(rows=rows, vectors=vectors, bits=sql.Literal(GROUP_BITS))


class GroupDecoder:
    """Decodes the binary COPY of `grouped_select` as its blocks arrive, never holding it whole.

    `feed` returns the groups its block completed, each as (int64 ids, native float16 matrix);
    `finish` checks that the stream ended. Raises `ReferenceSetError` when vectors differ in
    length or ids do not ascend (the matrix rows must follow the ids). `native`: the vectors
    come little-endian (`grouped_select(..., native=True)`), else big-endian as sent.
    """

    def __init__(self, native: bool = False) -> None:
        self._order = "<" if native else ">"
        self._pending = bytearray()
        self._started = False
        self._ended = False
        self.dim: int | None = None
        self._last_id: int | None = None

    def feed(self, block: bytes | memoryview) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._pending:  # the rest of a row that the previous block cut
            self._pending += block
            groups, at = self._rows(memoryview(self._pending))
            del self._pending[:at]  # the views into it are gone with `_rows`'s frame
        else:  # psycopg hands over one COPY message (one group, ~2 MB) a block: decoded in place
            groups, at = self._rows(memoryview(block))
            self._pending = bytearray(memoryview(block)[at:])
        return groups

    def _rows(self, data: memoryview) -> tuple[list[tuple[np.ndarray, np.ndarray]], int]:
        """The groups of the complete rows at the start of `data`, and where the rest begins."""
        groups: list[tuple[np.ndarray, np.ndarray]] = []
        at = 0
        if not self._started:
            if len(data) < len(_HEADER):
                return groups, at
            at, self._started = len(_HEADER), True
        while not self._ended and len(data) - at >= 2:
            fields = int.from_bytes(data[at : at + 2], "big", signed=True)
            if fields == -1:
                self._ended, at = True, at + 2
                break
            if fields != 2:
                raise ReferenceSetError(f"unexpected COPY row of {fields} fields in the reference fetch")
            parts, end = self._fields(data, at + 2)
            if parts is None:
                break
            groups.append(self._group(*parts))
            at = end
        return groups, at

    @staticmethod
    def _fields(data: memoryview, at: int) -> tuple[tuple[memoryview, memoryview] | None, int]:
        values = []
        for _ in range(2):
            if len(data) < at + 4:
                return None, at
            size = int.from_bytes(data[at : at + 4], "big", signed=True)
            if len(data) < at + 4 + size:
                return None, at
            values.append(data[at + 4 : at + 4 + size])
            at += 4 + size
        return (values[0], values[1]), at

    def _group(self, id_bytes: memoryview, vector_bytes: memoryview) -> tuple[np.ndarray, np.ndarray]:
        ids = np.frombuffer(id_bytes, dtype=">i4").astype(np.int64)
        if not len(ids):  # string_agg of no row: never made by grouped_select
            raise ReferenceSetError("the reference fetch returned an empty group")
        if self.dim is None:
            self.dim = int.from_bytes(
                vector_bytes[:2], "little" if self._order == "<" else "big", signed=True
            )
        order = self._order
        record = np.dtype(
            [("dim", order + "i2"), ("unused", order + "i2"), ("values", order + "f2", (self.dim,))]
        )
        if len(vector_bytes) != len(ids) * record.itemsize:
            raise ReferenceSetError(
                f"reference embeddings of one model and layer have different dimensions "
                f"(sequences {int(ids[0])}–{int(ids[-1])}, others have {self.dim})"
            )
        rows = np.frombuffer(vector_bytes, dtype=record)
        odd = np.flatnonzero(rows["dim"] != self.dim)
        if len(odd):
            raise ReferenceSetError(
                f"reference embeddings of one model and layer have different dimensions: sequence "
                f"{int(ids[odd[0]])} has a {int(rows['dim'][odd[0]])}-dim embedding, others have {self.dim}"
            )
        after_last = self._last_id is None or ids[0] > self._last_id
        if not (after_last and bool((ids[1:] > ids[:-1]).all())):
            raise ReferenceSetError("the reference fetch returned sequence ids out of order")
        self._last_id = int(ids[-1])
        return ids, rows["values"].astype(np.float16)

    def finish(self) -> None:
        if not self._ended or self._pending:
            raise ReferenceSetError("the reference fetch ended early (the COPY stream was cut short)")
