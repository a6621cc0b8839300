"""Content digests of files: the data version of a query file, the identity of a binary."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_digest(path: str | Path, length: int | None = 16) -> str:
    """SHA-256 of a file's bytes as hex, cut to `length` digits (None: all 64)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:length]
