"""What the machine did besides a benchmark's work, for the benchmarks to print beside their figures."""

from __future__ import annotations


class Steal:
    """Share of the machine's CPU time the hypervisor took (`steal` in /proc/stat) while the
    context is open: on a shared virtual machine, the noise a wall-time ratio cannot see.
    None where /proc/stat has no such column."""

    @staticmethod
    def _ticks() -> tuple[int, int] | None:
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return (fields[7], sum(fields[:8])) if len(fields) >= 8 else None

    def __enter__(self) -> Steal:
        self.share: float | None = None
        self._start = self._ticks()
        return self

    def __exit__(self, *exc_info: object) -> None:
        end = self._ticks()
        if self._start is not None and end is not None and end[1] > self._start[1]:
            self.share = (end[0] - self._start[0]) / (end[1] - self._start[1])

    def text(self) -> str:
        return "n/a" if self.share is None else f"{100 * self.share:.1f} %"


class Usage:
    """This process's user and system CPU seconds and minor page faults while the context is
    open (`resource.getrusage`). On a virtual machine that hands freed memory back to its host,
    a page touched for the first time can cost a host fault as well, counted here as system
    time: the part of a round's wall time that follows memory rather than work."""

    @staticmethod
    def _now() -> tuple[float, float, int]:
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime, usage.ru_stime, usage.ru_minflt

    def __enter__(self) -> Usage:
        self.user = self.system = 0.0
        self.faults = 0
        self._start = self._now()
        return self

    def __exit__(self, *exc_info: object) -> None:
        end = self._now()
        self.user, self.system = end[0] - self._start[0], end[1] - self._start[1]
        self.faults = end[2] - self._start[2]

    def text(self) -> str:
        return (
            f"CPU user {self.user:.1f} s, system {self.system:.1f} s, {self.faults / 1000:.0f}k page faults"
        )


def first_touch_ms_per_mib(mib: int = 64, rounds: int = 3, pause: float = 3.0) -> tuple[float, float]:
    """(first, second) touch of `mib` MiB of newly mapped anonymous memory, in ms per MiB: the
    median of `rounds`, each after `pause` seconds idle (long enough for a guest kernel that
    reports free pages to its host to have reported the ones the last round freed). On bare
    metal both are a fraction of a millisecond; where the host must fault the pages in again,
    the first is tens of times the second."""
    import mmap
    import statistics
    import time

    import numpy as np

    size, first, second = mib << 20, [], []
    for _ in range(rounds):
        time.sleep(pause)
        with mmap.mmap(-1, size) as memory:
            pages = np.frombuffer(memory, dtype=np.uint8)[:: mmap.PAGESIZE]
            for touches in (first, second):
                started = time.perf_counter()
                pages += 1  # one write per page
                touches.append(1000 * (time.perf_counter() - started) / mib)
            del pages  # the buffer's export must end before the mapping closes
    return statistics.median(first), statistics.median(second)
