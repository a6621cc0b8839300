"""Stage timings: `with timed(timings, "search"):` adds the block's wall time to `timings`;
`timed_concurrently` runs independent stages side by side and times each."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")

# When a list (a benchmark sets it, `bench/lookup.py --timeline`): every `timed` block's (stage,
# thread name, start, end), in `time.perf_counter` seconds, so that the stages' order and overlap
# across threads, and the time outside any stage, can be read from one run; and every `part`'s,
# its name starting with PART.
TIMELINE: list[tuple[str, str, float, float]] | None = None
PART = "· "


@contextmanager
def timed(timings: dict[str, float], stage: str) -> Iterator[None]:
    """Add the seconds the block took to `timings[stage]`, also when it raises.

    Added, not set: a stage run twice in one report (two batches, say) counts both.
    """
    started = time.perf_counter()
    try:
        yield
    finally:
        ended = time.perf_counter()
        timings[stage] = timings.get(stage, 0.0) + ended - started
        if TIMELINE is not None:
            TIMELINE.append((stage, threading.current_thread().name, started, ended))


@contextmanager
def part(name: str) -> Iterator[None]:
    """Record the block in `TIMELINE` alone, as `PART` + `name`: a part of a stage, or work no
    stage times (torch's import and the card's start, `lookup_start.torch_ahead`), that a cold
    run's timeline should show, with no row of its own in any stage table. Nothing when no
    timeline is kept; a timeline switched off while the block runs (a thread that outlives its
    run) still gets the block, in the list it was started with."""
    timeline = TIMELINE
    if timeline is None:
        yield
        return
    started = time.perf_counter()
    try:
        yield
    finally:
        timeline.append((PART + name, threading.current_thread().name, started, time.perf_counter()))


OVERLAP = "overlap (stages run side by side)"


def timed_concurrently(
    timings: dict[str, float],
    stages: dict[str, Callable[[], T]],
    into: Mapping[str, dict[str, float]] | None = None,
) -> dict[str, T]:
    """Run independent `stages` (name → function) side by side in threads; their results by name.

    Each stage's own seconds are added to `timings[name]` (or to `into[name][name]`: a stage
    timed with a partition's stages, say), and the time they overlapped, negative, to
    `timings[OVERLAP]`: all the timings together still add up to the wall time. The stages must not share
    anything they write (files, mutable objects). All of them are waited for; then the error of
    the first failed stage in the order given is raised, so that the same failure always wins.
    The work is in libraries that release the GIL (DuckDB, polars, file system calls).
    """
    if not stages:
        return {}
    names = list(stages)
    started = time.perf_counter()
    own: dict[str, float] = {}

    def run(name: str) -> T:
        with timed(own, name):
            return stages[name]()

    results: dict[str, T] = {}
    error: BaseException | None = None
    with ThreadPoolExecutor(max(1, len(names) - 1), thread_name_prefix="stage") as pool:
        futures = {name: pool.submit(run, name) for name in names[1:]}
        try:  # the first stage in this thread: one thread fewer to start
            results[names[0]] = run(names[0])
        except BaseException as caught:  # raised below, once the other stages have ended
            error = caught
        wait(futures.values())
    elapsed = time.perf_counter() - started
    for name in names:
        target = (into or {}).get(name, timings)
        target[name] = target.get(name, 0.0) + own[name]
    timings[OVERLAP] = timings.get(OVERLAP, 0.0) + elapsed - sum(own.values())
    if error is not None:
        raise error
    results.update((name, future.result()) for name, future in futures.items())
    return {name: results[name] for name in names}
