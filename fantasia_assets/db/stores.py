"""Caches of what the lookup reads from the database: reference matrices, annotations, sequences.

The matrix and the annotation table are kept under `$FANTASIA_HOME/cache`, keyed by a
fingerprint of the rows they come from (`db.reads`), so an unchanged reference set is never
fetched twice; a damaged cache file is fetched again rather than trusted. Each store asks its
`source` for fingerprints and rows: the database (`snapshot.LiveReads`, the default), or a current
stamp's answers (`snapshot.RecordedReads`, the lookup that does not start the server).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from ..core.exports import atomic_write, remove_stale_siblings
from ..core.progress import Progress, no_progress
from ..core.references import ReferenceMatrix, ReferenceScope, ReferenceSetError
from ..core.sequences import clean_many

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from .snapshot import LiveReads, RecordedReads

log = logging.getLogger(__name__)

# Code versions (Dagster's asset `code_version`): bumped when the same database rows would give
# another reference matrix (`ReferenceStore`) or annotation table (`AnnotationStore`).
MATRIX_CODE_VERSION = "matrix-2"  # 2: a float16 .npy memory map instead of an .npz
ANNOTATIONS_CODE_VERSION = "annotations-1"


# The matrix cache: `matrix-<fingerprint>.npy` holds the float16 vectors (a plain .npy whose
# data start at a page boundary, memory-mapped read-only by the lookup and by Dask workers) and
# `matrix-<fingerprint>.ids.npy` the int64 sequence ids. Written vectors first, ids last, each
# atomically, so a matrix is complete exactly when both files are there and agree.
_HEADER_BYTES = 4096
_WRITE_ROWS = 8192  # rows per block when a matrix already in memory is written out
_DIGEST_BYTES = 16  # `core.row_digests`: BLAKE2b, 16 bytes a row
_SAMPLED_ROWS = 64  # rows of a cached matrix compared with their digests before it is used
_HASHED_AHEAD = 8  # streamed blocks (≈ 2 MB each) waiting for their digests, at most


def _npy_header(rows: int, dim: int) -> bytes:
    """A .npy (version 1.0) header of exactly `_HEADER_BYTES` for a (rows, dim) float16 array."""
    text = repr({"descr": np.dtype(np.float16).str, "fortran_order": False, "shape": (rows, dim)})
    length = _HEADER_BYTES - 10  # magic (6), version (2), header length (2)
    return np.lib.format.magic(1, 0) + length.to_bytes(2, "little") + (text.ljust(length - 1) + "\n").encode()


class _VectorFile:
    """Appends float16 blocks to a .npy file whose header is written last (the row count is
    known only at the end of the stream); synced to disk before the caller renames it."""

    def __init__(self, handle) -> None:
        self.handle = handle
        self.rows = 0
        self.dim = 0
        handle.write(bytes(_HEADER_BYTES))

    def append(self, block: np.ndarray) -> None:
        if self.rows and block.shape[1] != self.dim:
            raise ValueError(f"a block of {block.shape[1]} columns after {self.dim}")
        self.dim = block.shape[1]
        self.handle.write(np.ascontiguousarray(block, dtype=np.float16).data)
        self.rows += len(block)

    def close(self, dim: int) -> None:
        self.handle.seek(0)
        self.handle.write(_npy_header(self.rows, self.dim or dim))
        self.handle.flush()
        os.fsync(self.handle.fileno())  # a crash after the rename must not leave a hole


def _npy_bytes(array: np.ndarray) -> bytes:
    """`array` as the bytes of a .npy file (np.save to a path would add ".npy" to a temporary's name)."""
    out = io.BytesIO()
    np.save(out, array)
    return out.getvalue()


def _write_ids(path: Path, ids: np.ndarray) -> None:
    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, np.asarray(ids, dtype=np.int64))
            handle.flush()
            os.fsync(handle.fileno())

    atomic_write(path, save)


class ReferenceStore:
    """Reference matrices by scope: memory (at most `max_in_memory`), then disk cache, then DB.

    Matrices come back with `vectors` a read-only float16 memory map of the cache file, so a
    million references cost page cache, not private memory, and are never held twice. The
    disk cache keeps the `max_on_disk` most recently used matrices.
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
        self._ahead: Future | None = None  # `prefetch`: (scope, matrix and source, or error) or None

    def prefetch(self, executor: Executor, choose: Callable[[], ReferenceScope | None]) -> Future:
        """Get, on `executor`, the matrix of the scope `choose()` names (None: nothing to get);
        the next `get` takes it from there (its error too) when it asks for that scope, with the
        source that fetch had. A cold matrix is mostly a wait on the database's COPY, with the
        interpreter released, so it overlaps with a Python-bound stage (the query scan), though
        each socket read waits for the interpreter that stage holds (`lookup_start`)."""

        def fetch() -> tuple[ReferenceScope, tuple[ReferenceMatrix, str] | Exception] | None:
            scope = choose()
            if scope is None:
                return None
            try:
                return scope, self._get(scope, no_progress)
            except Exception as error:  # raised by the `get` that asks for this scope, if one does
                return scope, error

        self._ahead = executor.submit(fetch)
        return self._ahead

    def fetching(self) -> bool:
        """Whether a `prefetch` is still running: the next `get` would wait for it."""
        ahead = self._ahead
        return ahead is not None and not ahead.done()

    def cache_file(self, fingerprint: str) -> Path:
        """Where the disk cache keeps the vectors of this fingerprint (a float16 .npy)."""
        return self.cache_dir / f"matrix-{fingerprint}.npy"

    @staticmethod
    def ids_file(vectors_file: Path) -> Path:
        """The sequence ids that go with a cached vectors file."""
        return vectors_file.with_name(vectors_file.name[: -len(".npy")] + ".ids.npy")

    @staticmethod
    def digests_file(vectors_file: Path) -> Path:
        """The row digests (`row_digests`) of a cached vectors file, once a run has taken them."""
        return vectors_file.with_name(vectors_file.name[: -len(".npy")] + ".digests.npy")

    @staticmethod
    def operands_prefix(vectors_file: Path) -> Path:
        """Where the search engine keeps its prepared operands of a cached vectors file (files
        `<prefix>.<metric>-<arithmetic>.*`, `core.knn_reference`), pruned with it."""
        return vectors_file.with_name(vectors_file.name[: -len(".npy")] + ".operands")

    def row_digests(self, matrix: ReferenceMatrix) -> list[bytes]:
        """`core.row_digests.row_digests(matrix.vectors)`, kept beside the matrix's cache file.

        The digests are a function of the rows alone, and a cache file holds the rows of its
        fingerprint and nothing else (module notes): a later full run on the same matrix reads
        them instead of hashing every row again (≈ 1 s of CPU at 124,000 × 1,024, ≈ 8 s at a
        million). A file of the wrong length or form is not used, and is replaced."""
        from ..core.row_digests import row_digests

        vectors_file = self.cache_file(matrix.fingerprint)
        path = self.digests_file(vectors_file)
        try:
            stored = np.load(path)
            if stored.dtype == np.uint8 and stored.shape == (len(matrix), _DIGEST_BYTES):
                data = stored.tobytes()
                return [data[at : at + _DIGEST_BYTES] for at in range(0, len(data), _DIGEST_BYTES)]
        except (OSError, ValueError, EOFError):
            pass  # none yet, or unreadable: taken again below
        digests = row_digests(matrix.vectors)
        if vectors_file.exists():
            self._keep_digests(vectors_file, digests, len(matrix))
        return digests

    def _keep_digests(self, vectors_file: Path, digests: list[bytes], rows: int) -> None:
        """Write `digests` (one per row of `vectors_file`) beside it; a cache: a failure is logged."""
        if len(digests) != rows or not all(len(digest) == _DIGEST_BYTES for digest in digests):
            return
        table = np.frombuffer(b"".join(digests), dtype=np.uint8).reshape(rows, _DIGEST_BYTES)
        try:
            atomic_write(self.digests_file(vectors_file), lambda tmp: tmp.write_bytes(_npy_bytes(table)))
        except OSError as error:  # a cache: the run goes on without it
            log.warning("row digests not kept beside %s (%s)", vectors_file, error)

    def _from_disk(self, path: Path, scope: ReferenceScope, fingerprint: str) -> ReferenceMatrix | None:
        try:
            ids = np.load(self.ids_file(path))
            vectors = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError) as exc:
            log.warning("damaged reference cache %s (%s); fetching from the database", path, exc)
            return None
        problem = _cache_problem(ids, vectors) or self._sampled_rows_problem(path, vectors)
        if problem:
            log.warning("damaged reference cache %s (%s); fetching from the database", path, problem)
            return None
        try:
            os.utime(path)  # recently used: kept by the pruning below
        except OSError:  # a cache this user may read but not write (shared, read-only): used as is
            log.debug("reference cache %s read-only: its time of use is not updated", path)
        # a matrix mapped from its own cache file: the engine keeps its prepared operands beside it
        # (`core.knn_reference`), for the next lookup of these rows (not on the run that streams
        # them from the database, which has the stream to pay for already)
        return ReferenceMatrix(scope, ids, vectors, fingerprint, kept_operands=self.operands_prefix(path))

    def _sampled_rows_problem(self, path: Path, vectors: np.ndarray) -> str | None:
        """Rows of `vectors` whose digests differ from those taken as the file was written, or None.

        `_SAMPLED_ROWS` rows spread evenly over the file (the first and last among them) are hashed
        and compared with the kept digests: a file of the right size but other content (rows
        reordered, zeroed or overwritten in bulk, another matrix's file) is caught at the cost of
        a few kilobytes read; a single damaged row between the samples is not. A file without its
        digests (not taken yet, or unreadable) is checked as before, by its shape alone."""
        try:
            table = np.load(self.digests_file(path), mmap_mode="r")
        except (OSError, ValueError, EOFError):
            return None
        if table.dtype != np.uint8 or table.shape != (len(vectors), _DIGEST_BYTES):
            return None  # not this file's digests: `row_digests` replaces them
        rows = np.unique(
            np.linspace(0, len(vectors) - 1, num=min(len(vectors), _SAMPLED_ROWS)).astype(np.int64)
        )
        from ..core.row_digests import row_digest

        wrong = [int(row) for row in rows if row_digest(vectors[row]) != table[row].tobytes()]
        if wrong:
            return (
                f"{len(wrong)} of {len(rows)} sampled rows (row {wrong[0]} first) differ from their digests"
            )
        return None

    def _from_database(self, path: Path, scope: ReferenceScope, fingerprint: str) -> ReferenceMatrix:
        """Stream the scope's rows into the cache file, then map it: never whole in memory.

        Each block's row digests (`row_digests`) are taken on another thread as the block
        arrives, and kept beside the file: the stream mostly waits on the server, and BLAKE2b
        releases the interpreter on rows of 2 KiB and more, so the hashing (≈ 0.6 CPU-s at
        124,000 × 1,024) fills that wait instead of competing with the search's outputs later."""
        from ..core.row_digests import row_digests

        blocks: list[np.ndarray] = []
        digests: list[Future] = []
        waiting = threading.BoundedSemaphore(_HASHED_AHEAD)
        with ThreadPoolExecutor(1, thread_name_prefix="row-digests") as hasher:

            def write(tmp: Path) -> None:
                with open(tmp, "wb") as handle:
                    out = _VectorFile(handle)

                    def take(ids: np.ndarray, vectors: np.ndarray) -> None:
                        blocks.append(ids)
                        vectors = np.ascontiguousarray(vectors, dtype=np.float16)  # the file's bytes
                        out.append(vectors)
                        waiting.acquire()  # a hasher that falls behind holds a few blocks, no more
                        digests.append(hasher.submit(row_digests, vectors))
                        digests[-1].add_done_callback(lambda _: waiting.release())

                    out.close(self.source.copy_reference_rows(scope, take))

            atomic_write(path, write)
            ids = np.concatenate(blocks) if blocks else np.empty(0, np.int64)
            _write_ids(self.ids_file(path), ids)
            self._keep_digests(path, [digest for block in digests for digest in block.result()], len(ids))
        return ReferenceMatrix(scope, ids, np.load(path, mmap_mode="r"), fingerprint)

    def shared_file(self, matrix: ReferenceMatrix) -> Path:
        """The matrix's cache file, written again if pruned since: what Dask workers load."""
        path = self.cache_file(matrix.fingerprint)
        if not (path.exists() and self.ids_file(path).exists()):
            _save_matrix(path, matrix)
            _write_ids(self.ids_file(path), matrix.sequence_ids)
        return path.resolve()

    def _prune(self) -> None:
        files = sorted(
            (
                f
                for f in self.cache_dir.glob("matrix-*.npy")
                if not f.name.endswith((".ids.npy", ".digests.npy")) and ".operands." not in f.name
            ),
            key=lambda f: f.stat().st_mtime,
            reverse=True,
        )
        for stale in files[self.max_on_disk :]:
            stale.unlink(missing_ok=True)
            self.ids_file(stale).unlink(missing_ok=True)
            self.digests_file(stale).unlink(missing_ok=True)
            prefix = self.operands_prefix(stale)
            for kept in self.cache_dir.glob(f"{prefix.name}.*"):
                kept.unlink(missing_ok=True)
            # and the temporaries of kept files whose writer died (`exports.tmp_sibling`): no later
            # write of those files would remove them once the matrix is gone
            for tmp in self.cache_dir.glob(f".{prefix.name}.*.tmp"):
                remove_stale_siblings(self.cache_dir / tmp.name[1:].rsplit(".", 2)[0])
        # caches of the earlier format (one .npz per matrix) are never read again
        for old in self.cache_dir.glob("matrix-*.npz"):
            old.unlink(missing_ok=True)

    def cached(self, scope: ReferenceScope, fingerprint: str) -> ReferenceMatrix | None:
        """The matrix of `fingerprint` if memory or the disk cache still holds it, else None
        (never fetched: the rows of an older fingerprint are no longer in the database)."""
        with self._lock:
            if fingerprint in self._memory:
                return self._memory[fingerprint]
        return self._from_disk(self.cache_file(fingerprint), scope, fingerprint)

    def get(self, scope: ReferenceScope, progress: Progress = no_progress) -> ReferenceMatrix:
        """The scope's matrix, fetched from the database only when its rows changed."""
        with self._lock:
            ahead, self._ahead = self._ahead, None
        try:
            fetched = ahead.result() if ahead is not None else None
        except Exception:  # the choice's own read failed: the plain path meets that error itself
            fetched = None
        if fetched is not None and fetched[0] == scope:
            if isinstance(fetched[1], Exception):
                raise fetched[1]
            matrix, self.last_source = fetched[1]
            return matrix
        matrix, self.last_source = self._get(scope, progress)
        return matrix

    def _get(self, scope: ReferenceScope, progress: Progress) -> tuple[ReferenceMatrix, str]:
        """(matrix, where it came from): "memory", "disk" or "database"."""
        fingerprint = self.source.reference_fingerprint(scope)
        with self._lock:
            if fingerprint in self._memory:
                self._memory.move_to_end(fingerprint)
                return self._memory[fingerprint], "memory"
        path = self.cache_file(fingerprint)
        matrix = self._from_disk(path, scope, fingerprint)
        source = "disk"
        if matrix is None:
            progress("fetch references", 0, 1)
            matrix = self._from_database(path, scope, fingerprint)
            self._prune()
            progress("fetch references", 1, 1)
            source = "database"
        if not len(matrix):
            kept = "every taxon" if scope.include_taxa is None else f"only {sorted(scope.include_taxa)}"
            raise ReferenceSetError(
                f"no reference embeddings for type_{scope.type_id} layer {scope.layer} after the taxonomy "
                f"filter (taxonomy: {kept}, excluding {sorted(scope.exclude_taxa) or 'none'}): the "
                "filter leaves no reference of this model; widen lookup.taxonomy"
            )
        with self._lock:
            if self.max_in_memory > 0:
                self._memory[fingerprint] = matrix
                while len(self._memory) > self.max_in_memory:
                    self._memory.popitem(last=False)
        return matrix, source


def _save_matrix(path: Path, matrix: ReferenceMatrix) -> None:
    """Write a matrix already at hand (a memory map whose file was pruned) in blocks."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            out = _VectorFile(handle)
            for start in range(0, len(matrix), _WRITE_ROWS):
                out.append(matrix.vectors[start : start + _WRITE_ROWS])
            out.close(matrix.dim)

    atomic_write(path, write)


def _cache_problem(ids: np.ndarray, vectors: np.ndarray) -> str | None:
    """Why a cached (ids, vectors) pair cannot be the matrix of a scope, or None.

    What a crash or a truncated copy leaves is caught here (the sizes are checked by the
    memory map itself); the content is not hashed, as reading 2 GiB to check it would cost what
    the cache saves. Writes are atomic and synced, so a torn file never carries the final name.
    A cache file is replaced or removed, never truncated in place: a process mapping it would
    fault (SIGBUS) on the pages cut off.
    """
    if vectors.dtype != np.float16 or vectors.ndim != 2:
        return f"vectors of {vectors.dtype} {vectors.shape}, expected a float16 matrix"
    if ids.dtype != np.int64 or ids.shape != (len(vectors),):
        return f"{ids.shape} ids of {ids.dtype} for {len(vectors)} vectors"
    if len(ids) > 1 and not bool((ids[1:] > ids[:-1]).all()):
        return "sequence ids not ascending"
    return None


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
            fetched = self.source.fetch_sequences(np.asarray(missing))
            texts = clean_many(fetched["sequence"].to_list())  # one C-level pass when all are clean
            self._known.update(zip(fetched["sequence_id"].to_list(), texts, strict=True))
        return {i: self._known[i] for i in wanted.tolist() if i in self._known}

    __call__ = get


def _live(engine: Engine | None) -> LiveReads:
    from .snapshot import LiveReads

    if engine is None:
        raise ValueError("a store needs an engine or a source")
    return LiveReads(engine)
