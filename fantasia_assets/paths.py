"""Where the platform keeps its state: `$FANTASIA_HOME` (default `.fantasia/` in the working directory)."""

from __future__ import annotations

import os
from pathlib import Path

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


def fantasia_home() -> Path:
    """The state directory (embedded database, caches), created on first use."""
    home = Path(os.environ.get("FANTASIA_HOME") or ".fantasia").expanduser().resolve()
    return state_folder(home, "FANTASIA_HOME")


def cache_dir(kind: str) -> Path:
    """A cache folder under `$FANTASIA_HOME/cache/<kind>`."""
    return state_folder(fantasia_home() / "cache" / kind, "the cache folder")
