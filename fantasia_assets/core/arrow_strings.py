"""A polars String Series from ASCII bytes and their offsets, handed over as Arrow, without pyarrow.

polars reads a column of text fastest as an Arrow string array: a buffer of all the bytes and
the offset where each value starts. Building that array with pyarrow costs pyarrow's import
(≈ 0.1 s, a noticeable share of a small lookup's start). This module describes the same two
buffers in the Arrow C data interface's own structs, made with ctypes, and gives them to polars
through the PyCapsule protocol (`__arrow_c_array__`), polars' public way in.

Ownership, as the C data interface defines it: polars moves the array struct out of ours and
later calls its `release` callback, from whichever thread drops the last column that uses the
buffers (polars keeps them without copying). Until then the numpy buffers and the pointer list
stay referenced in `_HELD`, under the id the struct carries as `private_data`; `release` drops
that reference and marks the struct released. The callback needs the GIL, as pyarrow's own
release of numpy-backed buffers does. If polars refuses the array, it is released here at once.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import threading

import numpy as np
import polars as pl

_INT32_MAX = 2**31 - 1


class _Schema(ctypes.Structure):
    pass


class _Array(ctypes.Structure):
    pass


_ReleaseSchema = ctypes.CFUNCTYPE(None, ctypes.POINTER(_Schema))
_ReleaseArray = ctypes.CFUNCTYPE(None, ctypes.POINTER(_Array))

_Schema._fields_ = [
    ("format", ctypes.c_char_p),
    ("name", ctypes.c_char_p),
    ("metadata", ctypes.c_char_p),
    ("flags", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("children", ctypes.c_void_p),
    ("dictionary", ctypes.c_void_p),
    ("release", _ReleaseSchema),
    ("private_data", ctypes.c_void_p),
]
_Array._fields_ = [
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.c_void_p),
    ("children", ctypes.c_void_p),
    ("dictionary", ctypes.c_void_p),
    ("release", _ReleaseArray),
    ("private_data", ctypes.c_void_p),
]

# constants the structs point at: they live as long as the module's code does
_UTF8, _LARGE_UTF8, _NO_NAME = b"u", b"U", b""
_SCHEMA_CAPSULE, _ARRAY_CAPSULE = b"arrow_schema", b"arrow_array"

_capsule = ctypes.pythonapi.PyCapsule_New
_capsule.restype = ctypes.py_object
_capsule.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]

_HELD: dict[int, tuple] = {}  # id → (offsets, data, pointer list) of arrays polars still uses
_ids = itertools.count(1)
_ids_lock = threading.Lock()


_NULL_SCHEMA_RELEASE, _NULL_ARRAY_RELEASE = _ReleaseSchema(), _ReleaseArray()  # NULL function pointers


def _release_schema(schema, _null=_NULL_SCHEMA_RELEASE) -> None:
    # a callback from foreign code must never raise
    with contextlib.suppress(BaseException):
        schema.contents.release = _null  # the format and name are module constants: nothing to free


def _release_array(array, _null=_NULL_ARRAY_RELEASE, _held=_HELD) -> None:
    # defaults, not globals: polars may drop a column while the interpreter is shutting down
    with contextlib.suppress(BaseException):
        _held.pop(array.contents.private_data or 0, None)
        array.contents.release = _null


_RELEASE_SCHEMA = _ReleaseSchema(_release_schema)
_RELEASE_ARRAY = _ReleaseArray(_release_array)


class _ArrowStringArray:
    """One Arrow string array, offered once through `__arrow_c_array__`."""

    def __init__(self, offsets: np.ndarray, data: np.ndarray) -> None:
        large = offsets.dtype == np.int64
        self.schema = _Schema(format=_LARGE_UTF8 if large else _UTF8, name=_NO_NAME, release=_RELEASE_SCHEMA)
        buffers = (ctypes.c_void_p * 3)(None, offsets.ctypes.data, data.ctypes.data)  # no validity: no nulls
        with _ids_lock:
            key = next(_ids)
        _HELD[key] = (offsets, data, buffers)
        self.array = _Array(
            length=len(offsets) - 1,
            null_count=0,
            offset=0,
            n_buffers=3,
            n_children=0,
            buffers=ctypes.addressof(buffers),
            release=_RELEASE_ARRAY,
            private_data=key,
        )

    def __arrow_c_array__(self, requested_schema=None):
        return (
            _capsule(ctypes.addressof(self.schema), _SCHEMA_CAPSULE, None),
            _capsule(ctypes.addressof(self.array), _ARRAY_CAPSULE, None),
        )

    def release_unmoved(self) -> None:
        """Release what polars did not take (its import failed, or it copied instead of moving)."""
        if self.array.release:
            self.array.release(ctypes.pointer(self.array))
        if self.schema.release:
            self.schema.release(ctypes.pointer(self.schema))


def ascii_series(data: np.ndarray, offsets: np.ndarray) -> pl.Series:
    """The String Series whose value i is `data[offsets[i]:offsets[i + 1]]` (ASCII bytes, no nulls).

    `data`: uint8, every byte below 128; `offsets`: starting at 0, non-decreasing, ending at
    `len(data)`. Both are checked, as polars trusts an Arrow string array as it comes (bytes
    that are not UTF-8 would be read past their end): a ValueError otherwise.
    """
    data = np.ascontiguousarray(data, dtype=np.uint8)
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    if len(offsets) == 0 or offsets[0] != 0 or offsets[-1] != len(data) or (offsets[1:] < offsets[:-1]).any():
        raise ValueError(f"offsets must run from 0, never decreasing, to the data's length ({len(data)})")
    if len(data) and data.max() >= 128:
        raise ValueError(f"byte {int(np.argmax(data >= 128))} of the text is not ASCII")
    if offsets[-1] <= _INT32_MAX:
        offsets = offsets.astype(np.int32)
    array = _ArrowStringArray(offsets, data)
    try:
        return pl.Series(array)
    finally:
        array.release_unmoved()
