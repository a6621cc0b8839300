"""All or nothing per run: a run's outputs are built aside and published together at the end.

A run of the whole lookup writes every output set (each partition's Parquet, shards and TopGO;
then the run-wide summary, ensemble, FASTA, mapping and records) into a hidden staging folder
`.run.{pid}-{random}.staging` under experiment_path, in the final layout. Only when everything
is written does `publish` record the list of entries in the folder's manifest and move them
into place, partition sets first, then the run-wide set. A run that fails before that leaves
the previous outputs exactly as they were, and removes its staging folder.

A run killed while publishing leaves a manifest behind: the next run (`recover`) finishes its
moves before starting, so the tree becomes the killed run's complete outputs, never a mix. So
does a publication that failed midway (a move refused by the file system): its staging folder is
kept for the next run. Ctrl-C during the moves (milliseconds) takes effect once they are done. A
staging folder without a manifest (killed while writing) is removed. Folders of live processes
(a concurrent run) are left alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from . import ahead, exports

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
_NAME = "run"  # staging folders are `.run.{pid}-{random}.staging`


def _pid_of(folder: Path) -> int | None:
    pid = folder.name[len(_NAME) + 2 :].split("-", 1)[0]
    return int(pid) if pid.isdigit() else None


def recover(experiment_path: Path) -> None:
    """Finish the publication of runs killed while publishing; drop the rest of dead runs' staging."""
    if not experiment_path.is_dir():
        return
    for folder in sorted(experiment_path.glob(f".{_NAME}.*.staging")):
        pid = _pid_of(folder)
        if pid is not None and pid != os.getpid() and exports.pid_alive(pid):
            continue
        manifest = folder / MANIFEST
        if manifest.exists():
            recorded = json.loads(manifest.read_text())
            entries = [Path(entry) for entry in recorded["entries"]]
            patches = {Path(f): names for f, names in recorded.get("patches", {}).items()}
            log.warning("%s: finishing the publication of a run that was killed while publishing", folder)
            _move_all(folder, experiment_path, entries, patches)
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _interrupts_held():
    """Ctrl-C (SIGINT) received during the block takes effect at its end: a KeyboardInterrupt
    between two moves would leave some entries published and the others not. Only the main
    thread can hold it; elsewhere an exception leaves the manifest for `recover`."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler installed outside Python: left alone
        yield
        return
    signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            log.warning("interrupted: the outputs were published first")
            if callable(previous):
                previous(signal.SIGINT, None)
            elif previous == signal.SIG_DFL:
                signal.raise_signal(signal.SIGINT)


def _move_all(
    staging: Path, experiment_path: Path, entries: list[Path], patches: dict[Path, list[str]] | None = None
) -> None:
    for entry in entries:
        staged, target = staging / entry, experiment_path / entry
        exports.remove_stale_siblings(target)
        if staged.exists() or staged.is_symlink():  # moved already by an earlier, killed attempt otherwise
            exports.swap_in(staged, target)
    # a patched folder: its staged files replace or join the published ones, the named ones go.
    # Each step can be repeated (a file moved or removed already is skipped), so a killed
    # publication finishes the same way; the rest of the folder is never rewritten
    for folder, removed in (patches or {}).items():
        staged, target = staging / folder, experiment_path / folder
        if staged.is_dir():
            for name in sorted(os.listdir(staged)):
                os.replace(staged / name, target / name)
        for name in removed:
            (target / name).unlink(missing_ok=True)


class RunStaging:
    """The staging folder of one run: write under `root`, then `publish(entries)`.

    Used as a context manager: leaving it without publishing (an error) removes the folder;
    an `OutputWriteError` then names the final path rather than the staging one.
    """

    def __init__(self, experiment_path: Path) -> None:
        self.experiment_path = Path(experiment_path)
        self.experiment_path.mkdir(parents=True, exist_ok=True)
        recover(self.experiment_path)
        self.root = exports.tmp_sibling(self.experiment_path / _NAME, "staging")
        self.root.mkdir()
        self._published = False

    def __enter__(self) -> RunStaging:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        ahead.discard(self.root)  # no file is made in it any more
        if (self.root / MANIFEST).exists() and not self._published:
            # some entries are published, the others only here: the next run finishes the moves
            log.error(
                "%s: publication stopped midway; the next run into it completes it", self.experiment_path
            )
        else:
            shutil.rmtree(self.root, ignore_errors=True)
        if isinstance(error, exports.OutputWriteError):
            message = str(error).replace(str(self.root), str(self.experiment_path))
            raise exports.OutputWriteError(error.errno, message) from error

    def make_ahead(self, folders: Iterable[Path], names: Iterable[str]) -> None:
        """Start making `names`, empty, in each of `folders` (relative to experiment_path) that is
        not published yet, while the run computes their content (`core.ahead`). A folder that is
        published already is left to its writer, which may link files from the published one."""
        names = list(names)
        targets = [self.root / f for f in folders if not (self.experiment_path / f).exists()]
        ahead.create_ahead((target, exports.tmp_sibling(target), names) for target in targets)

    def publish(self, entries: list[Path], patches: dict[Path, list[str]] | None = None) -> None:
        """Move `entries` (paths relative to experiment_path, written under `root`) into place.

        `patches`: published folders updated file by file instead (an incremental run's shards):
        folder → the file names to remove; the files staged under the folder are moved in."""
        missing = [str(entry) for entry in entries if not (self.root / entry).exists()]
        if missing:
            raise FileNotFoundError(f"staged outputs missing before publication: {missing}")
        patches = patches or {}

        def publish() -> None:
            manifest = {
                "entries": [str(e) for e in entries],
                "patches": {str(f): n for f, n in patches.items()},
            }
            with _interrupts_held():
                exports.write_bytes_atomic(self.root / MANIFEST, json.dumps(manifest).encode())
                _move_all(self.root, self.experiment_path, entries, patches)
                self._published = True

        exports.writing(self.experiment_path, publish)
