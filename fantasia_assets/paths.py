"""Where the platform keeps its state: `$FANTASIA_HOME` (default `.fantasia/` in the working directory)."""

from __future__ import annotations

import os
from pathlib import Path


def fantasia_home() -> Path:
    """The state directory (embedded database, caches), created on first use."""
    home = Path(os.environ.get("FANTASIA_HOME") or ".fantasia").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def cache_dir(kind: str) -> Path:
    """A cache folder under `$FANTASIA_HOME/cache/<kind>`."""
    path = fantasia_home() / "cache" / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
