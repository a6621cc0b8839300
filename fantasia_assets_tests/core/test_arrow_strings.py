"""ASCII text handed to polars as an Arrow string array described with ctypes (no pyarrow)."""

from __future__ import annotations

import gc
import threading

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fantasia_assets.core import arrow_strings
from fantasia_assets.core.arrow_strings import ascii_series


def _buffers(values: list[str]) -> tuple[np.ndarray, np.ndarray]:
    data = np.frombuffer("".join(values).encode("ascii"), dtype=np.uint8)
    offsets = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    return data, offsets


@settings(max_examples=60, deadline=None)
@given(st.lists(st.text(alphabet=st.characters(max_codepoint=127), max_size=40), max_size=300))
def test_the_series_holds_exactly_the_values(values: list[str]) -> None:
    series = ascii_series(*_buffers(values))
    assert series.dtype == pl.String and series.null_count() == 0
    assert series.to_list() == values


def test_large_offsets_are_read_as_large_strings() -> None:
    # the int64-offset layout (data over 2 GiB) on a small array
    values = ["x", "", "yz", "0.125"]
    data, offsets = _buffers(values)
    array = arrow_strings._ArrowStringArray(offsets, data)
    try:
        series = pl.Series(array)
    finally:
        array.release_unmoved()
    assert series.to_list() == values


@pytest.mark.parametrize(
    ("data", "offsets", "message"),
    [
        (b"abc", [0, 2], "offsets must run"),  # does not end at the data's length
        (b"abc", [1, 3], "offsets must run"),  # does not start at 0
        (b"abc", [0, 2, 1, 3], "offsets must run"),  # decreasing
        (b"abc", [], "offsets must run"),
        (b"ab\xff", [0, 3], "byte 2 of the text is not ASCII"),
        ("é".encode(), [0, 2], "byte 0 of the text is not ASCII"),
    ],
)
def test_bad_buffers_are_refused_before_polars_sees_them(
    data: bytes, offsets: list[int], message: str
) -> None:
    held = len(arrow_strings._HELD)
    with pytest.raises(ValueError, match=message):
        ascii_series(np.frombuffer(data, dtype=np.uint8), np.array(offsets, dtype=np.int64))
    assert len(arrow_strings._HELD) == held


def test_the_buffers_live_while_polars_uses_them_and_are_released_after() -> None:
    gc.collect()
    held = len(arrow_strings._HELD)
    # longer than 12 bytes: polars' string views then point into the data buffer, not copy it
    values = [f"{i / 7:.15f}" for i in range(50_000)]
    series = ascii_series(*_buffers(values))
    frame = pl.DataFrame({"v": series})
    del series
    gc.collect()
    assert len(arrow_strings._HELD) in (held, held + 1)  # held while the frame reads them, unless copied
    churn = [np.full(1 << 16, 7, dtype=np.uint8) for _ in range(64)]  # reuse freed memory, if any were
    assert frame["v"].to_list() == values
    del churn
    del frame
    gc.collect()
    assert len(arrow_strings._HELD) == held  # released: nothing kept for the process's life


def test_columns_made_and_dropped_on_many_threads() -> None:
    gc.collect()
    held = len(arrow_strings._HELD)
    made: list[pl.Series] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(seed: int) -> None:
        try:
            for round_ in range(30):
                values = [f"{seed}.{round_}.{i}.{'x' * (i % 20)}" for i in range(2_000)]
                series = ascii_series(*_buffers(values))
                assert series.to_list() == values
                with lock:
                    made.append(series)
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(made) == 120 and held <= len(arrow_strings._HELD) <= held + 120

    dropper = threading.Thread(target=made.clear)  # the release runs on another thread
    dropper.start()
    dropper.join()
    gc.collect()
    assert len(arrow_strings._HELD) == held


def test_a_process_that_exits_with_the_columns_alive_ends_cleanly() -> None:
    # polars may release the buffers while the interpreter tears the modules down
    import subprocess
    import sys

    code = (
        "import numpy as np, polars as pl\n"
        "from fantasia_assets.core.arrow_strings import ascii_series\n"
        "values = [f'{i / 3:.15f}' for i in range(10_000)]\n"
        "data = np.frombuffer(''.join(values).encode(), dtype=np.uint8)\n"
        "offsets = np.concatenate([[0], np.cumsum([len(v) for v in values])])\n"
        "kept = pl.DataFrame({'v': ascii_series(data, offsets)})\n"
        "print(kept.height)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip(), done.stderr) == (0, "10000", "")
