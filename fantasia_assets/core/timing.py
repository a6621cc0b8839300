"""Stage timings: `with timed(timings, "search"):` adds the block's wall time to `timings`."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the seconds the block took to `timings[stage]`, also when it raises.

    Added, not set: a stage run twice in one report (two batches, say) counts both.
    """
    started = time.perf_counter()
    try:
        yield
    finally:
        timings[stage] = timings.get(stage, 0.0) + time.perf_counter() - started
