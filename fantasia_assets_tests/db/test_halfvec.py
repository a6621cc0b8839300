"""The one halfvec COPY codec: what the loader encodes, the reference fetch decodes exactly."""

from __future__ import annotations

import itertools
import struct

import numpy as np
import pytest
from pgvector import HalfVector

from fantasia_assets.core.references import ReferenceSetError
from fantasia_assets.db import halfvec


def test_encode_then_decode_returns_ids_and_float16_values_exactly():
    rng = np.random.default_rng(7)
    ids = np.array([3, 1, 2**31 - 1, 40], dtype=np.int64)
    vectors = rng.standard_normal((4, 33)).astype(np.float16)
    decoded_ids, decoded = halfvec.decode(halfvec.encode(ids, vectors))
    np.testing.assert_array_equal(decoded_ids, ids)
    assert decoded.dtype == np.float16 and decoded.flags.c_contiguous
    np.testing.assert_array_equal(decoded.view(np.uint16), vectors.view(np.uint16))


def test_each_row_is_what_pgvector_python_encodes():
    """The vectorised framing equals the plain one: per row, int4 id then pgvector's halfvec."""
    ids = np.array([1, 70000, 5], dtype=np.int64)
    vectors = np.array([[0.5, -2.0, 65504.0], [0.0, -0.0, 1e-7], [np.inf, 1.0, -1.5]], dtype=np.float16)
    plain = b"".join(
        struct.pack(">hiii", 2, 4, sequence_id, 4 + 2 * 3) + HalfVector(vector).to_binary()
        for sequence_id, vector in zip(ids.tolist(), vectors, strict=True)
    )
    payload = halfvec.encode(ids, vectors)
    assert payload[19:-2] == plain
    assert payload[:19] == b"PGCOPY\n\xff\r\n\x00" + bytes(8) and payload[-2:] == b"\xff\xff"


def test_empty_stream_decodes_to_empty_arrays():
    ids, vectors = halfvec.decode(halfvec.encode(np.empty(0, np.int64), np.empty((0, 8), np.float16)))
    assert ids.shape == (0,) and vectors.shape == (0, 0)


def test_rows_of_two_lengths_are_an_error():
    short = halfvec.encode(np.array([1]), np.zeros((1, 4), np.float16))
    long = halfvec.encode(np.array([2]), np.zeros((1, 6), np.float16))
    mixed = short[:-2] + long[19:]  # header and first row of one, second row and trailer of the other
    with pytest.raises(ReferenceSetError, match="different dimensions"):
        halfvec.decode(mixed)


def _grouped_copy(groups: list[tuple[np.ndarray, np.ndarray]], native: bool = False) -> bytes:
    """The binary COPY `grouped_select` yields: per group, the int4 ids and the halfvec sends
    (with `native`, each halfvec as stored on a little-endian server)."""
    rows = []
    for ids, vectors in groups:
        id_bytes = np.asarray(ids).astype(">i4").tobytes()
        if native:
            vector_bytes = b"".join(
                struct.pack("<hh", len(v), 0) + np.asarray(v, "<f2").tobytes() for v in vectors
            )
        else:
            vector_bytes = b"".join(HalfVector(v).to_binary() for v in vectors)
        rows.append(
            struct.pack(">hi", 2, len(id_bytes))
            + id_bytes
            + struct.pack(">i", len(vector_bytes))
            + vector_bytes
        )
    return b"PGCOPY\n\xff\r\n\x00" + bytes(8) + b"".join(rows) + b"\xff\xff"


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("block", [1, 7, 19, 1000, 10**6])
def test_grouped_rows_decode_in_blocks_cut_anywhere(block, native):
    """The reference fetch decodes COPY blocks as they arrive, cut anywhere: the same rows, in
    either byte order of the vectors."""
    rng = np.random.default_rng(11)
    ids = np.arange(1, 51, dtype=np.int64) * 3
    vectors = rng.standard_normal((50, 17)).astype(np.float16)
    payload = _grouped_copy(
        [(ids[:20], vectors[:20]), (ids[20:21], vectors[20:21]), (ids[21:], vectors[21:])], native
    )
    decoder = halfvec.GroupDecoder(native)
    groups = [g for i in range(0, len(payload), block) for g in decoder.feed(payload[i : i + block])]
    decoder.finish()
    assert decoder.dim == 17 and len(groups) == 3
    np.testing.assert_array_equal(np.concatenate([g[0] for g in groups]), ids)
    decoded = np.concatenate([g[1] for g in groups])
    assert decoded.dtype == np.float16
    np.testing.assert_array_equal(decoded.view(np.uint16), vectors.view(np.uint16))


@pytest.mark.parametrize("kind", ["bytes", "memoryview"])
def test_grouped_rows_decode_from_whole_messages_as_from_one_stream(kind):
    """Blocks of whole COPY messages, as psycopg hands them over (header with the first row, one
    row each, the trailer alone), are decoded in place: the same groups as bytes cut anywhere."""
    rng = np.random.default_rng(12)
    ids = np.arange(1, 41, dtype=np.int64) * 2
    vectors = rng.standard_normal((40, 9)).astype(np.float16)
    parts = [(ids[:15], vectors[:15]), (ids[15:16], vectors[15:16]), (ids[16:], vectors[16:])]
    payload = _grouped_copy(parts)
    rows = [len(_grouped_copy(parts[:n])) - 2 for n in range(len(parts) + 1)]  # where each row ends
    cuts = [0, *rows[1:], len(payload)]
    wrap = memoryview if kind == "memoryview" else bytes
    messages = [wrap(payload[a:b]) for a, b in itertools.pairwise(cuts)]
    decoder, reference = halfvec.GroupDecoder(), halfvec.GroupDecoder()
    groups = [g for m in messages for g in decoder.feed(m)]
    expected = [g for i in range(len(payload)) for g in reference.feed(payload[i : i + 1])]
    decoder.finish()
    reference.finish()
    assert len(groups) == len(expected) == 3
    for (got_ids, got), (want_ids, want) in zip(groups, expected, strict=True):
        np.testing.assert_array_equal(got_ids, want_ids)
        assert got.dtype == want.dtype == np.float16 and got.flags.c_contiguous
        np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_grouped_rows_of_two_lengths_or_out_of_order_or_cut_short_are_errors():
    four, six = np.zeros((2, 4), np.float16), np.zeros((1, 6), np.float16)
    mixed = _grouped_copy([(np.array([1, 2]), four), (np.array([3]), six)])
    with pytest.raises(ReferenceSetError, match="different dimensions"):
        halfvec.GroupDecoder().feed(mixed)
    backwards = _grouped_copy([(np.array([5, 6]), four), (np.array([4]), four[:1])])
    with pytest.raises(ReferenceSetError, match="out of order"):
        halfvec.GroupDecoder().feed(backwards)
    decoder = halfvec.GroupDecoder()
    decoder.feed(_grouped_copy([(np.array([1, 2]), four)])[:-5])
    with pytest.raises(ReferenceSetError, match="cut short"):
        decoder.finish()


# the values a halfvec can hold at float16's edges (pgvector refuses NaN and ±inf): extremes,
# signed zeros, subnormals, the smallest normal
_HOSTILE = np.array(
    [[65504.0, -65504.0, 0.0, -0.0], [6e-8, -6e-8, 6.104e-5, 1.0], [2.0**-24, -(2.0**-14), 0.333, -2.0]],
    np.float16,
)


def test_native_and_sent_reads_of_the_server_give_the_same_bits(engine):
    """On the embedded server (migrated by a superuser) the stored form is read; it decodes to the
    very bits `halfvec_send`'s form decodes to, float16's edge values included."""
    from psycopg import sql

    rng = np.random.default_rng(3)
    rows = np.vstack([_HOSTILE, rng.standard_normal((2100, 4))]).astype(np.float16)
    ids = np.arange(1, len(rows) + 1) * 2  # 2,100+ rows: several groups of 2^GROUP_BITS ids
    decoded = {}
    with engine.connect() as conn:
        cursor = conn.connection.driver_connection.cursor()
        cursor.execute("CREATE TEMP TABLE hv (sequence_id int4, embedding halfvec)")
        with cursor.copy("COPY hv FROM STDIN (FORMAT binary)") as copy:
            copy.write(halfvec.encode(ids, rows))
        function = halfvec.native_reads(cursor)
        assert function is not None
        for native in (function, None):
            decoder = halfvec.GroupDecoder(native is not None)
            query = halfvec.grouped_select(sql.SQL("SELECT sequence_id, embedding FROM hv"), native)
            with cursor.copy(sql.SQL("COPY ({}) TO STDOUT (FORMAT binary)").format(query)) as copy:
                decoded[native is not None] = [group for block in copy for group in decoder.feed(block)]
            decoder.finish()
        conn.rollback()
    for native in (True, False):
        assert len(decoded[native]) > 2
        np.testing.assert_array_equal(np.concatenate([g[0] for g in decoded[native]]), ids)
        got = np.concatenate([g[1] for g in decoded[native]])
        np.testing.assert_array_equal(got.view(np.uint16), rows.view(np.uint16))


@pytest.mark.parametrize("change", ["dropped", "big-endian"])
def test_without_the_stored_form_the_fetch_reads_the_sent_form(sample_loaded, change):
    """A database without the function (migrated by a role that is not a superuser), or whose
    function answers in another byte order (a big-endian server, simulated by one that returns
    the sent form), is read through `halfvec_send`: the same matrix."""
    from fantasia_assets.core.references import ReferenceScope
    from fantasia_assets.db.reads import fetch_reference_matrix

    before = fetch_reference_matrix(sample_loaded, ReferenceScope(1, 0), "test")
    with sample_loaded.begin() as conn:
        if change == "dropped":
            conn.exec_driver_sql("DROP FUNCTION fa_halfvec_bytes(halfvec)")
        else:
            conn.exec_driver_sql(
                "CREATE OR REPLACE FUNCTION fa_halfvec_bytes(halfvec) RETURNS bytea "
                "LANGUAGE sql AS 'SELECT halfvec_send($1)'"
            )
    with sample_loaded.connect() as conn:
        assert halfvec.native_reads(conn.connection.driver_connection.cursor()) is None
    after = fetch_reference_matrix(sample_loaded, ReferenceScope(1, 0), "test")
    assert len(before.sequence_ids) > 0
    np.testing.assert_array_equal(after.sequence_ids, before.sequence_ids)
    np.testing.assert_array_equal(after.vectors.view(np.uint16), before.vectors.view(np.uint16))
