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
