"""Caches of what the lookup reads from the database: reference matrices, annotations, sequences.

The matrix and the annotation table are kept under `$FANTASIA_HOME/cache`, keyed by a
fingerprint of the rows they come from (`db.reads`), so an unchanged reference set is never
fetched twice; a damaged cache file is fetched again rather than trusted. Each store asks its
`source` for fingerprints and rows: the database (`snapshot.LiveReads`, the default), or a current
stamp's answers (`snapshot.RecordedReads`, the lookup that does not start the server).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from ..core.exports import atomic_write
from ..core.progress import Progress, no_progress
from ..core.references import ReferenceMatrix, ReferenceScope, ReferenceSetError
from ..core.sequences import clean

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from .snapshot import LiveReads, RecordedReads

log = logging.getLogger(__name__)

# Code versions (Dagster's asset `code_version`): bumped when the same database rows would give
# another reference matrix (`ReferenceStore`) or annotation table (`AnnotationStore`).
MATRIX_CODE_VERSION = "matrix-1"
ANNOTATIONS_CODE_VERSION = "annotations-1"


def _save_matrix(tmp: Path, matrix: ReferenceMatrix) -> None:
    with open(tmp, "wb") as handle:
        np.savez(handle, sequence_ids=matrix.sequence_ids, vectors=matrix.vectors)


class ReferenceStore:
    """Reference matrices by scope: memory (at most `max_in_memory`), then disk cache, then DB.

    The disk cache keeps the `max_on_disk` most recently used matrices.
    """

    def __init__(
        self,
        engine: Engine | None,
        cache_dir: Path,
        max_in_memory: int = 4,
        max_on_disk: int = 8,
        source: LiveReads | RecordedReads | None = None,
    ) -> None:
        self.engine = engine
        self.source = source or _live(engine)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.max_in_memory = max_in_memory
        self.max_on_disk = max_on_disk
        self._memory: OrderedDict[str, ReferenceMatrix] = OrderedDict()
        self._lock = threading.Lock()
        self.last_source: str | None = None  # "memory", "disk" or "database", for reports

    def cache_file(self, fingerprint: str) -> Path:
        """Where the disk cache keeps the matrix of this fingerprint."""
        return self.cache_dir / f"matrix-{fingerprint}.npz"

    def _from_disk(self, path: Path, scope: ReferenceScope, fingerprint: str) -> ReferenceMatrix | None:
        try:
            with np.load(path) as stored:
                matrix = ReferenceMatrix(scope, stored["sequence_ids"], stored["vectors"], fingerprint)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            log.warning("damaged reference cache %s (%s); fetching from the database", path, exc)
            return None
        os.utime(path)  # recently used: kept by the pruning below
        return matrix

    def shared_file(self, matrix: ReferenceMatrix) -> Path:
        """The matrix's cache file, written again if pruned since: what Dask workers load."""
        path = self.cache_file(matrix.fingerprint)
        if not path.exists():
            atomic_write(path, lambda tmp: _save_matrix(tmp, matrix))
        return path.resolve()

    def _prune(self) -> None:
        files = sorted(self.cache_dir.glob("matrix-*.npz"), key=lambda f: f.stat().st_mtime, reverse=True)
        for stale in files[self.max_on_disk :]:
            stale.unlink(missing_ok=True)

    def get(self, scope: ReferenceScope, progress: Progress = no_progress) -> ReferenceMatrix:
        """The scope's matrix, fetched from the database only when its rows changed."""
        fingerprint = self.source.reference_fingerprint(scope)
        with self._lock:
            if fingerprint in self._memory:
                self._memory.move_to_end(fingerprint)
                self.last_source = "memory"
                return self._memory[fingerprint]
        path = self.cache_file(fingerprint)
        matrix = self._from_disk(path, scope, fingerprint)
        if matrix is not None:
            self.last_source = "disk"
        else:
            progress("fetch references", 0, 1)
            matrix = self.source.fetch_reference_matrix(scope, fingerprint)
            atomic_write(path, lambda tmp: _save_matrix(tmp, matrix))
            self._prune()
            progress("fetch references", 1, 1)
            self.last_source = "database"
        if not len(matrix):
            raise ReferenceSetError(
                f"no reference embeddings for type_{scope.type_id} layer {scope.layer} "
                "after the taxonomy filter"
            )
        with self._lock:
            if self.max_in_memory > 0:
                self._memory[fingerprint] = matrix
                while len(self._memory) > self.max_in_memory:
                    self._memory.popitem(last=False)
        return matrix


class AnnotationStore:
    """The annotation table, cached as Parquet per annotation version and taxonomy filter."""

    def __init__(
        self, engine: Engine | None, cache_dir: Path, source: LiveReads | RecordedReads | None = None
    ) -> None:
        self.engine = engine
        self.source = source or _live(engine)
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)

    def get(self, scope: ReferenceScope | None = None) -> tuple[pl.DataFrame, str]:
        """(annotations, version) for the scope's taxonomy filter."""
        filter_key = {k: v for k, v in (scope.key() if scope else {}).items() if k in ("include", "exclude")}
        version = self.source.annotation_version()
        key = hashlib.sha256(json.dumps([version, filter_key]).encode()).hexdigest()[:16]
        path = self.cache_dir / f"annotations-{key}.parquet"
        if path.exists():
            return pl.read_parquet(path), version
        frame = self.source.fetch_annotations(scope)
        atomic_write(path, frame.write_parquet)
        return frame, version


class SequenceCache:
    """Reference sequences by id, fetched once per run however many stages ask for them.

    Called with an array of ids, it returns {id: sequence}: the plain function core stages take.
    """

    def __init__(self, engine: Engine | None, source: LiveReads | RecordedReads | None = None) -> None:
        self.engine = engine
        self.source = source or _live(engine)
        self._known: dict[int, str] = {}

    def get(self, sequence_ids: np.ndarray) -> dict[int, str]:
        wanted = np.unique(np.asarray(sequence_ids, dtype=np.int64))
        missing = [i for i in wanted.tolist() if i not in self._known]
        if missing:
            # under the sequence rule, as at load: references stored before it may hold gaps
            fetched = self.source.fetch_sequences(np.asarray(missing)).iter_rows()
            self._known.update((sequence_id, clean(sequence)) for sequence_id, sequence in fetched)
        return {i: self._known[i] for i in wanted.tolist() if i in self._known}

    __call__ = get


def _live(engine: Engine | None) -> LiveReads:
    from .snapshot import LiveReads

    if engine is None:
        raise ValueError("a store needs an engine or a source")
    return LiveReads(engine)
