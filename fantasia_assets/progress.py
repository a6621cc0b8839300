"""Progress of long work (loading, lookup, clustering) for a terminal and for Dagster's log.

Core code takes a `Progress` callable and calls it with (stage, done, total); it knows nothing
of where the messages go. `terminal_progress` draws one updating line on a TTY and prints
occasional lines otherwise; `log_progress` sends throttled messages to any logger (Dagster's
`context.log` included).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int) -> None: ...


def no_progress(stage: str, done: int, total: int) -> None:
    """A `Progress` that reports nothing."""


class _Throttled:
    """Emit at most every `interval` seconds per stage, and always at the start and the end."""

    def __init__(self, emit: Callable[[str, int, int, float], None], interval: float) -> None:
        self._emit = emit
        self._interval = interval
        self._last: dict[str, float] = {}
        self._start: dict[str, float] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        start = self._start.setdefault(stage, now)
        last = self._last.get(stage)
        if last is None or done >= total or now - last >= self._interval:
            self._last[stage] = now
            self._emit(stage, done, total, now - start)


def _line(stage: str, done: int, total: int, elapsed: float) -> str:
    share = f"{100.0 * done / total:5.1f}%" if total else "  -  "
    rate = f"{done / elapsed:,.0f}/s" if elapsed > 0 and done else ""
    return f"{stage}: {done:,}/{total:,} {share} {rate}".rstrip()


def terminal_progress(stream=None, interval: float | None = None) -> Progress:
    """Progress on a terminal: a redrawn line on a TTY, a line every few seconds otherwise."""
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()

    def emit(stage: str, done: int, total: int, elapsed: float) -> None:
        text = _line(stage, done, total, elapsed)
        if tty:
            end = "\n" if done >= total else ""
            stream.write("\r\x1b[2K" + text + end)
        else:
            stream.write(text + "\n")
        stream.flush()

    return _Throttled(emit, interval if interval is not None else (0.2 if tty else 5.0))


def log_progress(logger, interval: float = 10.0) -> Progress:
    """Progress as `logger.info` lines, at most one per stage every `interval` seconds."""

    def emit(stage: str, done: int, total: int, elapsed: float) -> None:
        logger.info(_line(stage, done, total, elapsed))

    return _Throttled(emit, interval)
