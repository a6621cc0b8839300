"""Scratch folders of the science code (OBO decompression, the CAFA evaluator's inputs).

They go under the folder a command configured (`use`: the CLI and the Dagster steps give
`$FANTASIA_HOME/tmp`), named `{host}~{pid}~{what}-…` so that the next command removes those of a
process killed before it could (`paths.clear_stale_temporaries`). Before any `use`, the system's
temporary folder is used, as by a library caller.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

SEPARATOR = "~"  # between host, process id and the rest, in every scratch name
_root: Callable[[], Path] | None = None


def use(root: Callable[[], Path]) -> None:
    """Put this process's scratch folders under `root()` from now on (called, and so created,
    only when a scratch folder is needed)."""
    global _root
    _root = root


def folder(what: str) -> tempfile.TemporaryDirectory:
    """A fresh scratch folder, removed when its `with` block ends."""
    if _root is None:
        return tempfile.TemporaryDirectory(prefix=f"fa-{what}-")
    prefix = SEPARATOR.join((socket.gethostname(), str(os.getpid()), f"{what}-"))
    return tempfile.TemporaryDirectory(prefix=prefix, dir=_root())
