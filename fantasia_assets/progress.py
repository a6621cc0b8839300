"""Progress of long work (loading, lookup, clustering) for a terminal and for Dagster's log.

Core code takes a `Progress` callable (`core.progress`) and calls it with (stage, done, total);
it knows nothing of where the messages go. `terminal_progress` draws one updating line on a TTY and prints
occasional lines otherwise; `log_progress` sends throttled messages to any logger (Dagster's
`context.log` included).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from .core.progress import Progress, no_progress

__all__ = ["Progress", "TerminalProgress", "log_progress", "no_progress", "terminal_progress"]


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


class TerminalProgress(_Throttled):
    """Progress on a terminal: a redrawn line on a TTY, a line every few seconds otherwise.

    On a TTY the line of an unfinished stage has no newline yet; `end_line()` ends it, so that
    what is printed next (an error, say) starts on its own line instead of after the progress.
    """

    def __init__(self, stream=None, interval: float | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._open_line = False
        super().__init__(self._draw, interval if interval is not None else (0.2 if self.tty else 5.0))

    def _draw(self, stage: str, done: int, total: int, elapsed: float) -> None:
        text = _line(stage, done, total, elapsed)
        if self.tty:
            self._open_line = done < total
            self.stream.write("\r\x1b[2K" + text + ("" if self._open_line else "\n"))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def end_line(self) -> None:
        """End a progress line left unfinished on a TTY (before printing anything else)."""
        if self._open_line:
            self._open_line = False
            self.stream.write("\n")
            self.stream.flush()


def terminal_progress(stream=None, interval: float | None = None) -> TerminalProgress:
    """Progress on a terminal (`stream`, default stderr): see `TerminalProgress`."""
    return TerminalProgress(stream, interval)


def log_progress(logger, interval: float = 10.0) -> Progress:
    """Progress as `logger.info` lines, at most one per stage every `interval` seconds."""

    def emit(stage: str, done: int, total: int, elapsed: float) -> None:
        logger.info(_line(stage, done, total, elapsed))

    return _Throttled(emit, interval)
