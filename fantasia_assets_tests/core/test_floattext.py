"""The vectorised fixed-precision float text equals polars' CSV writer byte for byte.

Hostile values: exact rounding ties (k/32, halves at every precision), values a hair either
side of a tie, random bit patterns (subnormals, huge, NaN payloads), ±0, ±inf, nulls, the edge
of the exact range, and Float32 columns; every precision the writer may be given.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from fantasia_assets.core import exports, floattext
from fantasia_assets.core.floattext import fixed_text


def _hostile(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    n = 3_000
    ties = rng.integers(0, 1 << 12, n) / 2.0 ** rng.integers(1, 12, n)
    return np.concatenate(
        [
            rng.random(n),
            -rng.random(n) * 7,
            rng.random(n) * 1e-3,
            ties,
            np.nextafter(ties, np.inf),
            np.nextafter(ties, -np.inf),
            np.frombuffer(rng.bytes(8 * n), dtype=np.float64),
            rng.standard_normal(n) * 10.0 ** rng.integers(-20, 20, n),
            [0.0, -0.0, np.nan, -np.nan, np.inf, -np.inf, 5e-324, -5e-324, 2.0**-900, 1e300, -1e300],
            [0.99995, 0.00015, 0.00025, 2.5, 0.5, 1.5, 9.9999, 99999.99995, 2.0**50, 2.0**50 / 1e4],
            [2.0**49 / 10**p for p in range(16)] + [np.nextafter(2.0**50 / 10**p, 0) for p in range(16)],
        ]
    )


@pytest.mark.parametrize("arrow", [False, True], ids=["fixed-width", "arrow-buffers"])
@pytest.mark.parametrize("precision", [0, 1, 2, 3, 4, 5, 6, 8, 12, 16])
def test_fixed_text_equals_polars_csv(precision: int, arrow: bool, monkeypatch) -> None:
    # both ways `_strings` hands the bytes to polars, on every column size
    monkeypatch.setattr(floattext, "_ARROW_VALUES", 0 if arrow else 1 << 62)
    values = pl.Series("v", _hostile(precision)).scatter([1, 7, 500], None)
    expected = pl.DataFrame({"v": values}).write_csv(float_precision=precision)
    ours = pl.DataFrame({"v": fixed_text(values, precision)}).write_csv()
    assert ours == expected


def test_float32_nulls_and_empty_columns() -> None:
    rng = np.random.default_rng(3)
    frame = pl.DataFrame(
        {
            "f32": pl.Series(rng.standard_normal(200) * 50, dtype=pl.Float32),
            "none": pl.Series([None] * 200, dtype=pl.Float64),
            "mixed": pl.Series([None if i % 3 else i / 7 for i in range(200)], dtype=pl.Float64),
            "text": ["a,b"] * 200,
            "count": list(range(200)),
        }
    )
    for precision in (0, 4, 9):
        expected = frame.write_csv(float_precision=precision)
        assert exports.csv_bytes(frame, precision).decode() == expected
        assert exports.csv_bytes(frame.head(0), precision).decode() == frame.head(0).write_csv()
    assert exports.csv_bytes(frame, None).decode() == frame.write_csv()


def test_precision_out_of_range_is_refused() -> None:
    with pytest.raises(ValueError, match="precision"):
        fixed_text(pl.Series([1.0]), 17)


@pytest.mark.parametrize("precision", [0, 4, 7])
def test_repeated_values_are_printed_once_with_the_same_text(precision: int) -> None:
    """Columns where few values repeat (a neighbour's distance on each of its GO rows) take the
    print-each-distinct-value path: 0.0 and -0.0, NaN, ties and nulls keep their own text."""
    rng = np.random.default_rng(precision)
    hostile = _hostile(precision)
    pool = np.concatenate([hostile[rng.integers(0, len(hostile), 40)], [0.0, -0.0, np.nan, 0.03125]])
    values = pl.Series("v", pool[rng.integers(0, len(pool), 20_000)]).scatter([0, 5, 19_999], None)
    expected = pl.DataFrame({"v": values}).write_csv(float_precision=precision)
    assert pl.DataFrame({"v": fixed_text(values, precision)}).write_csv() == expected


@pytest.mark.parametrize("precision", [0, 4, 6])
def test_csv_bytes_of_mixed_float_columns_equals_polars(precision: int) -> None:
    """`fixed_floats` prints columns of many distinct values and repetitive ones, and leaves
    columns of nulls to polars: the CSV is polars' own, hostile values included."""
    rng = np.random.default_rng(precision + 10)
    hostile = _hostile(precision)
    n = 6_000
    pool = np.concatenate([hostile[rng.integers(0, len(hostile), 30)], [0.0, -0.0, np.nan, np.inf]])
    frame = pl.DataFrame(
        {
            "distinct": pl.Series(hostile[rng.integers(0, len(hostile), n)]).scatter([3], None),
            "repeated": pl.Series(pool[rng.integers(0, len(pool), n)]).scatter([0, n - 1], None),
            "f32": pl.Series(pool[rng.integers(0, len(pool), n)], dtype=pl.Float32, strict=False),
            "none": pl.Series([None] * n, dtype=pl.Float64),
            "name": ["a,b\nc"] * n,
        }
    )
    expected = frame.with_columns(pl.col("name").str.replace_all("\n", " "))
    assert exports.csv_bytes(frame, precision).decode() == expected.write_csv(float_precision=precision)


def test_a_large_column_takes_the_arrow_buffers_with_the_same_text() -> None:
    values = pl.Series("v", np.tile(_hostile(11), 3)).scatter([2, 70_000], None)
    assert len(values) > floattext._ARROW_VALUES
    for precision in (3, 6):
        expected = pl.DataFrame({"v": values}).write_csv(float_precision=precision)
        assert pl.DataFrame({"v": fixed_text(values, precision)}).write_csv() == expected
    single = pl.Series("v", np.random.default_rng(5).random(floattext._ARROW_VALUES + 5))  # one layout
    text = fixed_text(single, 4)
    assert text.dtype == pl.String
    assert pl.DataFrame({"v": text}).write_csv() == pl.DataFrame({"v": single}).write_csv(float_precision=4)


def test_no_column_imports_pyarrow() -> None:
    # the Arrow buffers are described with ctypes (`core.arrow_strings`): pyarrow's import would
    # weigh on a small lookup's start
    import subprocess
    import sys

    code = (
        "import sys, polars as pl\n"
        "from fantasia_assets.core import floattext\n"
        "small = floattext.fixed_text(pl.Series([0.5, -1.25, None] * 100), 3)\n"
        "large = floattext.fixed_text(pl.Series([0.5, -1.25, None] * 100_000), 3)\n"
        "assert 300 < floattext._ARROW_VALUES < 300_000\n"
        "assert large.to_list()[:3] == ['0.500', '-1.250', None] and small.to_list() == large.to_list()[:300]\n"
        "print(sorted(m for m in sys.modules if m.startswith('pyarrow')))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
