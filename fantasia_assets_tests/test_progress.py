"""Terminal progress: one line redrawn in place with rate and time left; log lines unchanged."""

from __future__ import annotations

import io
import logging
import re

from fantasia_assets.progress import log_progress, terminal_progress

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _frames(text: str) -> list[str]:
    """What the terminal shows after each redraw: the text after the last clear of each write."""
    return [_ANSI.sub("", frame) for frame in text.split("\r\x1b[2K") if frame]


def test_tty_line_is_redrawn_with_rate_and_time_left_and_ends_once(monkeypatch):
    monkeypatch.setenv("TERM", "xterm-256color")
    ticks = iter(float(t) for t in range(1000))
    terminal = _Terminal()
    progress = terminal_progress(terminal, interval=0, clock=lambda: next(ticks))
    for done in range(0, 101, 10):
        progress("search NEAR|layer_0", done, 100)
    progress("fetch references", 0, 1)
    progress.end_line()
    frames = _frames(terminal.getvalue())
    assert frames[0].startswith("search NEAR|layer_0: 0/100 ") and "0%" in frames[0]
    middle = frames[5]
    assert middle.startswith("search NEAR|layer_0: 50/100 ") and "50%" in middle
    assert re.search(r" \d[\d,]*/s ", middle) and re.search(r"\d:\d\d:\d\d$", middle)  # rate, time left
    assert all("\n" not in frame for frame in frames[:10])  # unfinished: redrawn in place
    assert frames[10].startswith("search NEAR|layer_0: 100/100 ") and frames[10].endswith("\n")
    assert frames[11].startswith("fetch references: 0/1 ") and frames[11].endswith("\n")  # ended by end_line
    assert all(len(frame.rstrip("\n")) < 200 for frame in frames)


def test_pipe_and_log_lines_keep_their_plain_form(caplog):
    pipe = io.StringIO()
    progress = terminal_progress(pipe, interval=0)
    progress("search NEAR|layer_0", 5, 10)
    assert pipe.getvalue().startswith("search NEAR|layer_0: 5/10  50.0%") and "\x1b" not in pipe.getvalue()
    logger = logging.getLogger("dagster-like")
    with caplog.at_level(logging.INFO, logger="dagster-like"):
        log_progress(logger, interval=0)("fetch references", 1, 1)
    assert caplog.messages == ["fetch references: 1/1 100.0%"]


def test_dumb_terminal_gets_plain_lines_without_escape_codes(monkeypatch):
    monkeypatch.setenv("TERM", "dumb")
    terminal = _Terminal()
    progress = terminal_progress(terminal, interval=0)
    for done in (0, 50, 100):
        progress("search NEAR|layer_0", done, 100)
    progress.end_line()
    text = terminal.getvalue()
    assert "\x1b" not in text and "\r" not in text
    assert text.splitlines()[-1].startswith("search NEAR|layer_0: 100/100")
