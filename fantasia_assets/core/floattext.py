"""Floats as fixed-precision text, vectorised, exactly as polars' CSV writer prints them.

polars' `write_csv(float_precision=p)` prints a float as Rust's `format!("{:.p$}")` does: the
exact binary value rounded to `p` digits after the point (ties to even, which only exactly
representable halves such as 0.03125 can be), a minus sign for every negative value and for
-0.0, and `NaN`, `inf`, `-inf`. It costs 150–450 ns of CPU a value, most of a summary's writing;
this module's text, written as strings, less (`exports.fixed_floats` has the measurements).

`fixed_text` computes the same text with array arithmetic. The exact product |x| · 10^p is
split without error into its float64 rounding `scaled` and the remainder `err` (Dekker's
two-product), so the nearest integer is decided exactly: up when fraction − ½ + err > 0, to
even when it is 0 (the sign of a float sum is always right). Its integer part and its fraction,
zero-padded to `p` digits, are written digit by digit into a byte matrix that polars reads as
strings (`_ascii`, `_strings`: from 1,024 values on as an Arrow string array described with
ctypes, `core.arrow_strings`, so that no pyarrow import, ≈ 0.1 s, weighs on a small lookup's
start). Values outside the range where this is exact (|x| · 10^p ≥ 2^50,
|x| < 2^-900, NaN, inf) are printed by Python's `'%.*f'`, which rounds the exact binary value
the same way (tests compare both on hostile values). A column whose values repeat over many rows
(a neighbour's distance on each of its GO rows) prints each distinct bit pattern once and
gathers the text.

Nothing here is shared mutable state, so outputs may be written from several threads at once.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from fantasia_assets.core.arrow_strings import ascii_series

# |x| · 10^p below 2^50: floor, fraction and the integer conversion are exact
_EXACT_LIMIT = 2.0**50
# below this Dekker's split loses bits to underflow; such values go to Python
_TINY = 2.0**-900
_SPLIT = 2.0**27 + 1.0
MAX_PRECISION = 16  # the configuration's bound; 10^p stays exact in float64 up to 22
_SPECIAL = {"nan": "NaN", "inf": "inf", "-inf": "-inf"}
_ARROW_VALUES = 1 << 10  # values from which `_strings` hands polars Arrow buffers (`core.arrow_strings`)


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
    """The text of `x` (nulls stay null): sign, integer part, point and zero-padded fraction
    as bytes built with array arithmetic; the values outside the exact range from Python."""
    magnitude = np.abs(x)
    with np.errstate(invalid="ignore", over="ignore"):
        fast = (magnitude * 10.0**precision < _EXACT_LIMIT) & ((magnitude >= _TINY) | (magnitude == 0))
    fast &= ~nulls
    whole, fraction = np.divmod(_nearest(np.where(fast, magnitude, 0.0), precision), 10**precision)
    text = _strings(*_ascii(whole, fraction, np.signbit(x) & fast, precision))
    text = pl.select(pl.when(pl.Series(fast)).then(text)).to_series()
    slow = np.flatnonzero(~fast & ~nulls)
    if len(slow):
        printed = (f"{v:.{precision}f}" for v in x[slow].tolist())
        text = text.scatter(slow, [_SPECIAL.get(t, t) for t in printed])
    return text


# 10, 100, … 10^18: a non-negative integer below 2^50 has 1 + (how many of these it reaches) digits
_POWERS = 10 ** np.arange(1, 19, dtype=np.int64)


def _ascii(
    whole: np.ndarray, fraction: np.ndarray, negative: np.ndarray, precision: int
) -> tuple[np.ndarray, np.ndarray]:
    """(a byte matrix, one row a value, NUL-padded at the end; each row's length) of
    '-'? + `whole` + ('.' + `fraction` zero-padded to `precision` digits if any).

    Rows of one layout (sign, number of integer digits) are filled column by column, so the
    cost is a few array operations per character instead of building strings value by value
    (polars' concatenation of the parts cost more than polars printing the floats itself)."""
    digits = 1 + np.searchsorted(_POWERS, whole, side="right")
    point = 1 if precision else 0
    columns = 1 + int(digits.max(initial=1)) + point + precision
    out = np.zeros((len(whole), columns), dtype=np.uint8)
    tail = np.empty((len(whole), point + precision), dtype=np.uint8)  # '.' and the fraction
    if precision:
        tail[:, 0] = ord(".")
        rest = fraction.astype(np.int32) if precision <= 9 else fraction  # narrower divides faster
        for column in range(precision, 0, -1):
            rest, digit = np.divmod(rest, 10)
            tail[:, column] = digit + ord("0")
    layout = negative.astype(np.int64) * 32 + digits
    layouts = np.unique(layout).tolist()
    for key in layouts:
        # all rows alike (the usual case: non-negative values below 10) are filled in place
        rows = slice(None) if len(layouts) == 1 else np.flatnonzero(layout == key)
        sign, count = divmod(key, 32)
        width = sign + count + point + precision
        block = out[:, :width] if len(layouts) == 1 else np.empty((len(rows), width), dtype=np.uint8)
        if sign:
            block[:, 0] = ord("-")
        rest = whole[rows]
        rest = rest.astype(np.int32) if count <= 9 else rest
        for column in range(sign + count - 1, sign - 1, -1):
            rest, digit = np.divmod(rest, 10)
            block[:, column] = digit + ord("0")
        block[:, sign + count :] = tail[rows]
        if len(layouts) > 1:
            out[rows, :width] = block
    return out, (layout // 32 + layout % 32 + point + precision).astype(np.int64)


def _strings(text: np.ndarray, lengths: np.ndarray) -> pl.Series:
    """Row i of the byte matrix `text`, its first `lengths[i]` bytes, as a String Series.

    From `_ARROW_VALUES` rows on, the bytes and their offsets become an Arrow string array that
    polars takes as it is (`core.arrow_strings`; measured at 2,000,000 values: 0.02-0.04 s
    against 0.15-0.21 s for polars' conversion of numpy's fixed-width bytes, which goes value
    by value; the two break even near 500 values); below that, the fixed-width bytes
    (NUL-padded at the end, which numpy drops)."""
    if len(text) < _ARROW_VALUES:
        return pl.Series(text.view(f"S{text.shape[1]}").ravel()).cast(pl.String)
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if len(lengths) and (lengths == lengths[0]).all():
        data = np.ascontiguousarray(text[:, : lengths[0]]).ravel()
    else:
        data = text[np.arange(text.shape[1]) < lengths[:, None]]  # row-major: the rows in order
    return ascii_series(data, offsets)  # already String
