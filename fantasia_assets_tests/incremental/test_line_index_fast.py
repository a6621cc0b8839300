"""The line index without a CSV parser (`_first_fields`) equals the parser's, on hostile files:
names of every width, runs and ties, NUL bytes, non-ASCII, empty first fields, lines with more or
fewer fields, quotes, carriage returns, a byte-order mark, unsorted names, invalid UTF-8."""

from __future__ import annotations

import random

import numpy as np
import pytest

from fantasia_assets.core import incremental_outputs as io_


def _index(body: bytes, separator: str, header: bool):
    try:
        return io_.line_index(body, separator, header)
    except Exception as error:  # the parser's refusal, which the shortcut must not hide
        return error


def _parsed(body: bytes, separator: str, header: bool):
    original = io_._first_fields
    io_._first_fields = lambda *args: None  # the parser's path
    try:
        return _index(body, separator, header)
    finally:
        io_._first_fields = original


def _same(a, b) -> bool:
    if a is None or b is None or isinstance(a, Exception) or isinstance(b, Exception):
        return type(a) is type(b)
    return (
        a.accessions.tolist() == b.accessions.tolist()
        and np.array_equal(a.bounds, b.bounds)
        and np.array_equal(a.lines, b.lines)
        and a.header_lines == b.header_lines
    )


NAMES = ["A", "AB", "B", "Bé", "Q0000001", "Q0000001x", "a" * 300, "x\x00y", "z", "ZZ", "ü"]


def _body(rng: random.Random, separator: str) -> bytes:
    names = sorted(rng.sample(NAMES, rng.randint(1, len(NAMES))), key=lambda n: n.encode())
    if rng.random() < 0.2:
        rng.shuffle(names)  # not sorted: no index
    lines = []
    fields = rng.randint(1, 4)
    for name in names:
        for _ in range(rng.randint(1, 4)):
            lines.append(separator.join([name] + [f"{rng.random():.4f}" for _ in range(fields - 1)]))
    hostile = rng.random()
    at = rng.randrange(len(lines))
    if hostile < 0.08:
        lines[at] = separator.join(["", *lines[at].split(separator)[1:]])  # empty first field
    elif hostile < 0.16:
        lines[at] += separator + "extra"  # more fields than the first line
    elif hostile < 0.24 and fields > 1:
        lines[at] = lines[at].split(separator)[0]  # fewer fields
    elif hostile < 0.30:
        lines[at] = '"' + lines[at].replace(separator, '"' + separator, 1)  # a quoted name
    elif hostile < 0.34:
        lines[at] += "\r"
    head = (separator.join(["accession"] + [f"c{i}" for i in range(fields - 1)]) + "\n").encode()
    body = ("\n".join(lines) + "\n").encode()
    if hostile > 0.97:
        body = b"\xef\xbb\xbf" + body
    elif hostile > 0.94:
        body = body.replace(b"\xc3\xa9", b"\xc3(")  # invalid UTF-8 where 'é' was
    return head + body


@pytest.mark.parametrize("seed", range(300))
def test_fast_line_index_equals_the_parsers(seed: int) -> None:
    rng = random.Random(seed)
    separator = rng.choice([",", "\t"])
    header = rng.random() < 0.5
    body = _body(rng, separator)
    if not header:
        body = body.split(b"\n", 1)[1]
    fast = _index(body, separator, header)
    assert _same(fast, _parsed(body, separator, header)), body[:300]


def test_the_shortcut_is_taken_on_plain_files() -> None:
    body = b"h,x\nA,1\nA,2\nB,3\n"
    data = np.frombuffer(body, dtype=np.uint8)
    ends = np.flatnonzero(data == 10) + 1
    names, lengths = io_._first_fields(body, data, 4, ends[1:], ",")
    assert names.tolist() == ["A", "B"] and lengths.tolist() == [2, 1]
