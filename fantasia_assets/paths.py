"""Where the platform keeps its state: `$FANTASIA_HOME` (default `.fantasia/` in the working directory)."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

from fantasia_assets.core.scratch import SEPARATOR
from fantasia_assets.errors import FantasiaError


class StateFolderError(FantasiaError, OSError):
    """A folder of the platform's state is not usable (a file in its place, say)."""


def state_folder(path: Path, what: str) -> Path:
    """Create the folder `path` (and its parents) or say in one line why it cannot be."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocker = next((p for p in [path, *path.parents] if p.exists() and not p.is_dir()), path)
        raise StateFolderError(
            f"{what} {path} cannot be a folder: {blocker} is a file; move it away, or set FANTASIA_HOME "
            "to another folder"
        ) from None
    except PermissionError:
        raise StateFolderError(f"{what} {path}: permission denied creating it") from None
    return path


log = logging.getLogger(__name__)

# Temporaries are named `{host}~{pid}~{random}{suffix}`, so a later process can tell whether
# their owner is still alive (on this host; another host's are never touched).
_SEPARATOR = SEPARATOR  # `core.scratch`: one rule for every scratch name


def _home_path() -> Path:
    return Path(os.environ.get("FANTASIA_HOME") or ".fantasia").expanduser().resolve()


def fantasia_home() -> Path:
    """The state directory (embedded database, caches), created on first use."""
    return state_folder(_home_path(), "FANTASIA_HOME")


def cache_dir(kind: str) -> Path:
    """A cache folder under `$FANTASIA_HOME/cache/<kind>`."""
    return state_folder(fantasia_home() / "cache" / kind, "the cache folder")


def temp_dir() -> Path:
    """`$FANTASIA_HOME/tmp`: scratch files of this platform, never the system's temporary folder.

    A process killed before removing its scratch files leaves them here, where
    `clear_stale_temporaries` (run when a command starts) removes them.
    """
    return state_folder(fantasia_home() / "tmp", "the scratch folder")


@contextlib.contextmanager
def temporary_file(suffix: str = "") -> Iterator[Path]:
    """A fresh path under `temp_dir()`, removed when the block ends (errors included)."""
    path = temp_dir() / _SEPARATOR.join(
        (socket.gethostname(), str(os.getpid()), secrets.token_hex(6) + suffix)
    )
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clear_stale_temporaries() -> list[Path]:
    """Remove the scratch files of this host's processes that no longer run; returns them.

    Only names this module made are considered; the folder is not created when absent.
    """
    folder = _home_path() / "tmp"
    if not folder.is_dir():
        return []
    host = socket.gethostname()
    removed = []
    try:
        entries = sorted(folder.iterdir())
    except OSError as error:  # tidying is a courtesy: a folder we cannot list stops nothing
        log.warning("cannot clear old scratch files in %s: %s", folder, error)
        return removed
    for entry in entries:
        parts = entry.name.split(_SEPARATOR)
        if len(parts) != 3 or parts[0] != host or not parts[1].isdigit():
            continue
        pid = int(parts[1])
        if pid == os.getpid() or _alive(pid):
            continue
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
        except OSError as error:
            log.warning("cannot remove the old scratch file %s: %s", entry, error)
            continue
        removed.append(entry)
        log.info("removed %s, left by process %d, which no longer runs", entry, pid)
    return removed
