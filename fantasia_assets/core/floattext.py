"""Floats as fixed-precision text, vectorised, exactly as polars' CSV writer prints them.

polars' `write_csv(float_precision=p)` prints a float as Rust's `format!("{:.p$}")` does: the
exact binary value rounded to `p` digits after the point (ties to even, which only exactly
representable halves such as 0.03125 can be), a minus sign for every negative value and for
-0.0, and `NaN`, `inf`, `-inf`. It costs about 300 ns of CPU a value, most of a summary's writing;
this module about half of that.

`fixed_text` computes the same text with array arithmetic. The exact product |x| · 10^p is
split without error into its float64 rounding `scaled` and the remainder `err` (Dekker's
two-product), so the nearest integer is decided exactly: up when fraction − ½ + err > 0, to
even when it is 0 (the sign of a float sum is always right). The digits are then written
straight into one byte buffer, column by column, and handed to polars as Arrow strings. Values
outside the range where this is exact (|x| · 10^p ≥ 2^50, |x| < 2^-900, NaN, inf) are printed
by Python's `'%.*f'`, which rounds the exact binary value the same way (tests compare both on
hostile values). A column whose values repeat over many rows (a neighbour's distance on each of
its GO rows) prints each distinct bit pattern once and gathers the text.

Nothing here is shared mutable state: the digit tables are built once and only read, so
outputs may be written from several threads at once.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

# |x| · 10^p below 2^50: floor, fraction and the integer conversion are exact
_EXACT_LIMIT = 2.0**50
# below this Dekker's split loses bits to underflow; such values go to Python
_TINY = 2.0**-900
_SPLIT = 2.0**27 + 1.0
MAX_PRECISION = 16  # the configuration's bound; 10^p stays exact in float64 up to 22
_SPECIAL = {"nan": "NaN", "inf": "inf", "-inf": "-inf"}
_POWERS = 10 ** np.arange(1, 19, dtype=np.int64)


def _split(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = _SPLIT * a
    high = t - (t - a)
    return high, a - high


def _nearest(magnitude: np.ndarray, precision: int) -> np.ndarray:
    """round(|x| · 10^p) of the exact product, ties to even, for values in the exact range."""
    scale = np.float64(10.0**precision)  # exact for p ≤ 22
    scaled = magnitude * scale
    a_high, a_low = _split(magnitude)
    s_high, s_low = _split(np.array([scale]))
    err = ((a_high * s_high - scaled) + a_high * s_low + a_low * s_high) + a_low * s_low
    whole = np.floor(scaled)
    above = (scaled - whole - 0.5) + err
    integer = whole.astype(np.int64)
    return integer + ((above > 0) | ((above == 0) & (integer & 1 == 1)))


def _digit_table(padded: bool) -> np.ndarray:
    """The 4 ASCII digits of 0..9999, zero-padded, or with leading zeros as 0 bytes (dropped)."""
    numbers = np.arange(10**_CHUNK)
    places = 10 ** np.arange(_CHUNK - 1, -1, -1)
    digits = (numbers[:, None] // places) % 10
    table = (48 + digits).astype(np.uint8)
    if not padded:
        leading = (numbers[:, None] < places) & (places > 1)
        table[leading] = 0
    return table.view(np.uint32).ravel()  # one word per number: its 4 bytes in text order


_CHUNK = 4  # digits per table lookup
_PADDED = _digit_table(padded=True)
_UNPADDED = _digit_table(padded=False)
_BLOCK = 1 << 16  # values per pass: the temporaries stay in cache


def fixed_text(values: pl.Series, precision: int) -> pl.Series:
    """`values` (a float Series) as text with `precision` digits after the point; nulls stay null."""
    if not 0 <= precision <= MAX_PRECISION:
        raise ValueError(f"precision must be within 0..{MAX_PRECISION}, got {precision}")
    if values.null_count() == len(values):
        return pl.Series(values.name, [None] * len(values), dtype=pl.String)
    x = values.cast(pl.Float64).to_numpy()
    nulls = values.is_null().to_numpy()
    if _repetitive(x):
        # many rows share few values (a neighbour's distance over its GO rows, a count):
        # each distinct bit pattern (so 0.0 and -0.0 stay apart) is printed once
        distinct, inverse = np.unique(x.view(np.int64), return_inverse=True)
        text = _text(distinct.view(np.float64), np.zeros(len(distinct), dtype=bool), precision)
        text = text.gather(inverse.ravel())
        if nulls.any():
            text = text.zip_with(pl.Series(~nulls), pl.Series([None] * len(x), dtype=pl.String))
        return text.alias(values.name)
    return _text(x, nulls, precision).alias(values.name)


def _repetitive(x: np.ndarray) -> bool:
    """Whether an evenly spaced sample of `x` holds at most a third as many distinct values."""
    if len(x) < 1024:
        return False
    sample = x[:: len(x) // 512].view(np.int64)
    return len(np.unique(sample)) * 3 <= len(sample)


def _text(x: np.ndarray, nulls: np.ndarray, precision: int) -> pl.Series:
    pieces, lengths = [], []
    for start in range(0, len(x), _BLOCK):
        text, length = _block(x[start : start + _BLOCK], nulls[start : start + _BLOCK], precision)
        pieces.append(text)
        lengths.append(length)
    offsets = np.zeros(len(x) + 1, dtype=np.int64)
    if len(x):
        np.cumsum(np.concatenate(lengths), out=offsets[1:])
    buffer = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.uint8)
    validity = pa.py_buffer(np.packbits(~nulls, bitorder="little")) if nulls.any() else None
    array = pa.LargeStringArray.from_buffers(
        len(x), pa.py_buffer(offsets), pa.py_buffer(buffer), validity, int(nulls.sum())
    )
    return pl.from_arrow(array).cast(pl.String)


def _digit_count(whole: np.ndarray) -> np.ndarray:
    """Decimal digits of each non-negative integer (1 for 0): one comparison per digit of the largest."""
    digits = np.ones(len(whole), dtype=np.int64)
    largest = int(whole.max(initial=0))
    for power in _POWERS[: len(str(largest)) - 1]:
        digits += whole >= power
    return digits


def _block(x: np.ndarray, nulls: np.ndarray, precision: int) -> tuple[np.ndarray, np.ndarray]:
    """The text of `x` (nulls: empty) as one byte buffer, and each value's length.

    Each value is laid out in a row of 4-byte slots: sign, integer digits (the top chunk's
    leading zeros as 0 bytes), point, fraction digits; unused bytes are 0, so the non-zero
    bytes in row order are the values' text one after the other.
    """
    magnitude = np.abs(x)
    with np.errstate(invalid="ignore", over="ignore"):
        fast = (magnitude * 10.0**precision < _EXACT_LIMIT) & ((magnitude >= _TINY) | (magnitude == 0))
    fast &= ~nulls
    rounded = _nearest(np.where(fast, magnitude, 0.0), precision)
    whole = rounded // 10**precision
    digits = _digit_count(whole)
    fraction_chunks = -(-precision // _CHUNK)
    whole_chunks = -(-int(digits.max(initial=1)) // _CHUNK)
    slots = 1 + whole_chunks + (1 + fraction_chunks if precision else 0)
    matrix = np.zeros((len(x), slots), dtype=np.uint32)
    negative = np.signbit(x) & fast
    matrix[negative, 0] = ord("-")
    remaining = whole
    for k in range(whole_chunks):
        chunk = remaining % 10**_CHUNK
        # the top chunk without leading zeros; above the top, nothing
        word = np.where(remaining < 10**_CHUNK, _UNPADDED[chunk], _PADDED[chunk])
        if k:
            word[remaining == 0] = 0
        matrix[:, whole_chunks - k] = word
        remaining = remaining // 10**_CHUNK
    if precision:
        matrix[:, whole_chunks + 1] = ord(".")
        # the fraction's digits, padded on the right to whole chunks whose padding is then cleared
        padding = fraction_chunks * _CHUNK - precision
        fraction = rounded % 10**precision * 10**padding
        for k in range(fraction_chunks):
            matrix[:, slots - 1 - k] = _PADDED[fraction % 10**_CHUNK]
            fraction //= 10**_CHUNK
        if padding:
            matrix[:, slots - 1] &= np.uint32((1 << (8 * (_CHUNK - padding))) - 1)
    matrix[~fast] = 0
    length = np.where(fast, negative + digits + (precision + 1 if precision else 0), 0)
    cells = matrix.view(np.uint8)
    body = cells[cells != 0]
    slow = np.flatnonzero(~fast & ~nulls)
    if not len(slow):
        return body, length
    ends = np.cumsum(length)
    printed = [_SPECIAL.get(t, t).encode() for t in (f"{v:.{precision}f}" for v in x[slow].tolist())]
    length[slow] = [len(t) for t in printed]
    parts, at = [], 0
    for index, text in zip(slow.tolist(), printed, strict=True):
        stop = ends[index]  # slow rows hold no cells: their text goes where the row would
        parts.append(body[at:stop])
        parts.append(np.frombuffer(text, dtype=np.uint8))
        at = stop
    parts.append(body[at:])
    return np.concatenate(parts), length
