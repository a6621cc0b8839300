"""Progress of long work (loading, lookup, clustering) for a terminal and for Dagster's log.

Core code takes a `Progress` callable (`core.progress`) and calls it with (stage, done, total);
it knows nothing of where the messages go. `terminal_progress` draws one updating line on a TTY
(with rich: bar, rate, time left) and prints occasional lines otherwise; `log_progress` sends
throttled messages to any logger (Dagster's `context.log` included).
"""

from __future__ import annotations

import io
import os
import shutil
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


def _rich_bars(width: int, clock: Callable[[], float] | None):
    """rich's console (rendering into a buffer) and progress bars for a TTY line of `width`.

    rich is imported here, not with the module: a run whose stderr is no terminal (a pipe, a
    log file, a benchmark) never draws with it, and its import costs such a small run ≈ 0.05 s.
    """
    from rich.console import Console
    from rich.progress import BarColumn, ProgressColumn, TaskProgressColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as RichProgress
    from rich.text import Text

    class Rate(ProgressColumn):
        """Items per second, as rich measures it over the last seconds."""

        def render(self, task) -> Text:
            return Text(f"{task.speed:,.0f}/s" if task.speed else "")

    console = Console(file=io.StringIO(), width=max(width, 40), force_terminal=True, highlight=False)
    bars = RichProgress(
        TextColumn("{task.description}: {task.completed:,}/{task.total:,}"),
        BarColumn(bar_width=24),
        TaskProgressColumn(),
        Rate(),
        TimeRemainingColumn(),
        console=console,
        auto_refresh=False,
        get_time=clock,
    )
    return console, bars


class TerminalProgress(_Throttled):
    """Progress on a terminal: a redrawn line on a TTY, a line every few seconds otherwise.

    On a TTY the line is drawn by rich (stage, count, bar, share, rate, time left), cleared and
    redrawn in place, cut to the terminal's width so that it never wraps; an unfinished stage's
    line has no newline yet, and `end_line()` ends it, so that what is printed next (an error,
    say) starts on its own line instead of after the progress.
    """

    def __init__(
        self, stream=None, interval: float | None = None, clock: Callable[[], float] | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        # a terminal that cannot move the cursor (TERM=dumb: Emacs shells, some CI logs) gets the
        # plain lines of a file, not escape codes it would print as they are
        self.tty = (
            hasattr(self.stream, "isatty") and self.stream.isatty() and os.environ.get("TERM") != "dumb"
        )
        self._open_line = False
        super().__init__(self._draw, interval if interval is not None else (0.2 if self.tty else 5.0))
        if self.tty:
            width = shutil.get_terminal_size((100, 24)).columns - 1
            # rich renders into a buffer; this class owns the terminal line (\r, clear, newline)
            self._console, self._bars = _rich_bars(width, clock)
            self._tasks: dict[str, int] = {}  # stage → rich's TaskID

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.tty:  # every call is a sample of rich's rate and time-left estimate
            if stage not in self._tasks:
                self._tasks[stage] = self._bars.add_task(stage, total=total)
            self._bars.update(self._tasks[stage], completed=done, total=total)
        super().__call__(stage, done, total)

    def _render(self, stage: str) -> str:
        task = next(t for t in self._bars.tasks if t.id == self._tasks[stage])
        with self._console.capture() as captured:
            self._console.print(self._bars.make_tasks_table([task]), no_wrap=True, overflow="ellipsis")
        return captured.get().rstrip("\n")

    def _draw(self, stage: str, done: int, total: int, elapsed: float) -> None:
        if self.tty:
            self._open_line = done < total
            self.stream.write("\r\x1b[2K" + self._render(stage) + ("" if self._open_line else "\n"))
            if not self._open_line:
                self._bars.remove_task(self._tasks.pop(stage))
        else:
            self.stream.write(_line(stage, done, total, elapsed) + "\n")
        self.stream.flush()

    def end_line(self) -> None:
        """End a progress line left unfinished on a TTY (before printing anything else)."""
        if self._open_line:
            self._open_line = False
            self.stream.write("\n")
            self.stream.flush()


def terminal_progress(
    stream=None, interval: float | None = None, clock: Callable[[], float] | None = None
) -> TerminalProgress:
    """Progress on a terminal (`stream`, default stderr): see `TerminalProgress`. `clock` (seconds)
    is what the rate and time left are measured with (default: the monotonic clock)."""
    return TerminalProgress(stream, interval, clock)


def log_progress(logger, interval: float = 10.0) -> Progress:
    """Progress as `logger.info` lines, at most one per stage every `interval` seconds."""

    def emit(stage: str, done: int, total: int, elapsed: float) -> None:
        logger.info(_line(stage, done, total, elapsed))

    return _Throttled(emit, interval)
