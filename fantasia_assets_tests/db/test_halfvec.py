"""The one halfvec COPY codec: what the loader encodes, the reference fetch decodes exactly."""

from __future__ import annotations

import numpy as np
import pytest

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


def test_empty_stream_decodes_to_empty_arrays():
    ids, vectors = halfvec.decode(halfvec.encode(np.empty(0, np.int64), np.empty((0, 8), np.float16)))
    assert ids.shape == (0,) and vectors.shape == (0, 0)


def test_rows_of_two_lengths_are_an_error():
    short = halfvec.encode(np.array([1]), np.zeros((1, 4), np.float16))
    long = halfvec.encode(np.array([2]), np.zeros((1, 6), np.float16))
    mixed = short[:-2] + long[19:]  # header and first row of one, second row and trailer of the other
    with pytest.raises(ReferenceSetError, match="different dimensions"):
        halfvec.decode(mixed)
