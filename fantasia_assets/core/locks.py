"""An exclusive lock per experiment_path, so that two runs never write into one folder at once.

The lock is a `flock` on the experiment_path folder itself: no lock file is left behind, it is
shared by every process that opens the folder (whatever its `FANTASIA_HOME`), and the kernel
drops it with the process, SIGKILL included. A run that finds the folder taken logs a warning
naming it and waits its turn. Re-entrant within a thread (the CLI run holds it while its
writers take it again); two threads of one process exclude each other like two processes.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from . import exports

log = logging.getLogger(__name__)

_held: dict[tuple[str, int], int] = {}  # (folder, thread) → depth
_held_lock = threading.Lock()
_LOCK_POLL_SECONDS = 0.1  # a waiting run's delay after the holder ends, and its Ctrl-C's


def _probe(folder: Path) -> None:
    """Fail now, not after the search, when nothing can be written into `folder`.

    Probes of processes killed between creating and removing theirs are removed first.
    """
    for stale in folder.glob(".probe.*.tmp"):
        pid = stale.name[len(".probe.") :].split("-", 1)[0]
        if pid.isdigit() and not exports.pid_alive(int(pid)):
            stale.unlink(missing_ok=True)
    probe = exports.tmp_sibling(folder / "probe", "tmp")
    probe.touch()
    probe.unlink()


def _same_folder(fd: int, folder: Path) -> bool:
    """Whether the locked descriptor is still the folder at `folder` (not one removed meanwhile)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(folder))
    except FileNotFoundError:
        return False


def _wait_for_lock(fd: int) -> None:
    """Take the lock once the holder lets it go, polling: a blocking flock() would not return
    on Ctrl-C when the kernel hands SIGINT to another of the process's threads (torch's, the
    start-up reads'), and only the main thread runs Python's signal handlers."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            time.sleep(_LOCK_POLL_SECONDS)


@contextmanager
def experiment_lock(experiment_path: Path, probe: bool = True) -> Iterator[None]:
    """Hold the exclusive lock of `experiment_path` (created when missing) for the block.

    With `probe`, a folder that cannot be written into is an `OutputWriteError` at once (a whole
    run, before its search); one output's writer needs no probe: its own write says so, and a
    probe file would be a write outside the folders it owns.
    """
    folder = Path(experiment_path)
    created = not folder.exists()
    exports.writing(folder, lambda: folder.mkdir(parents=True, exist_ok=True))
    key = (str(folder.resolve()), threading.get_ident())
    with _held_lock:
        depth = _held.get(key, 0)
        _held[key] = depth + 1
    if depth:
        try:
            yield
        finally:
            with _held_lock:
                _held[key] -= 1
        return
    fd = None
    try:
        if probe:
            exports.writing(folder, lambda: _probe(folder))
        while True:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.warning("another run is writing into %s; waiting for it to finish", folder)
                _wait_for_lock(fd)
                log.warning("the other run into %s finished; continuing", folder)
            if _same_folder(fd, folder):
                break
            # the run before removed the folder it had made and left empty: make it again
            os.close(fd)
            fd = None
            exports.writing(folder, lambda: folder.mkdir(parents=True, exist_ok=True))
        yield
    finally:
        if fd is not None:
            if created:
                # a run that made the folder and wrote nothing (refused early) leaves no trace
                with contextlib.suppress(OSError):
                    folder.rmdir()  # fails unless empty
            os.close(fd)  # releases the lock
        with _held_lock:
            del _held[key]
