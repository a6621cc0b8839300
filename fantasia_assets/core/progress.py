"""The progress protocol core stages report through: a callable taking (stage, done, total).

Core code knows nothing of where the messages go; `fantasia_assets.progress` draws them on a
terminal or sends them to a logger (Dagster's `context.log` included).
"""

from __future__ import annotations

from typing import Protocol


class Progress(Protocol):
    def __call__(self, stage: str, done: int, total: int) -> None: ...


def no_progress(stage: str, done: int, total: int) -> None:
    """A `Progress` that reports nothing."""
