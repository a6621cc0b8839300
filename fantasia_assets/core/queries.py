"""Reading embedding files in FANTASIA's HDF5 layout, lazily and fast.

Layout (SPEC §2.1)::

    /accession_<ID>/sequence                       UTF-8 string
    /accession_<ID>/type_<id>/layer_<k>/embedding  1-D float32/float64 vector
    /accession_<ID>/type_<id>/embedding            legacy entry without layers (layer None)

Opening an HDF5 object costs about 50 µs in the HDF5 library itself, so a file of 100k
proteins is first *scanned* once into an `EmbeddingCatalogue`: accessions, sequences, and for
every (type, layer) the byte offset, dtype and length of each vector. The scan reads each group's
metadata straight from the file (`h5fast`, ~0.1 ms a group; `h5bulk` decodes the groups laid out
alike together, ~20 µs a group) and leaves any group that reader
declines to h5py (in parallel worker processes when most of a big file is declined). Vectors are then gathered from a memory map of the file in
one vectorised copy, without opening their datasets again. Datasets that are chunked or
compressed (no single byte offset) are read through h5py instead.
"""

from __future__ import annotations

import logging
import mmap
import os
import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fantasia_assets.errors import FantasiaError

from .digest import file_digest
from .exports import atomic_write
from .h5bits import link_address
from .h5fast import FastLayout
from .h5heaps import endless_attributes
from .h5plain import LAYER_PREFIX, TYPE_PREFIX, LayerKey, scan_group
from .knn_inputs import directionless, euclidean_refused
from .sequences import fasta_named_otherwise

log = logging.getLogger(__name__)

ACCESSION_PREFIX = "accession_"

# Files with fewer groups than this are scanned in-process: workers cost more than they save.
_PARALLEL_SCAN_MIN_GROUPS = 4000
_FAST_PROBE = 512  # groups read before deciding between the direct reader and h5py workers
_NATIVE_LIST = [np.dtype("<f4"), np.dtype("<f8")]  # by dtype code (`h5plain.NATIVE_DTYPES`)

# bump when EmbeddingCatalogue changes shape or meaning (2: clean sequences, rank > 1 skipped)
_CATALOGUE_FORMAT = 2

# The `layer_index` a legacy entry has in the database, where PIS makes the column NOT NULL:
# no real layer uses it (layers count from 0 = last hidden).
LEGACY_LAYER_INDEX = -1


class EmbeddingFileError(FantasiaError, ValueError):
    """A query or reference HDF5 file cannot be used; the message names file, group and reason."""


@dataclass
class LayerEntries:
    """Where the vectors of one (type, layer) live in the file, one entry per protein having it."""

    rows: np.ndarray  # int64 positions in EmbeddingCatalogue.accessions
    offsets: np.ndarray  # int64 byte offsets of contiguous little-endian data, -1 otherwise
    dims: np.ndarray  # int64 vector lengths
    dtype_codes: np.ndarray  # int8 index into _NATIVE_LIST, or -1 for anything else

    @property
    def dim(self) -> int:
        """The common vector length (0 when empty)."""
        return int(self.dims[0]) if len(self.dims) else 0


@dataclass
class EmbeddingCatalogue:
    """The structure of one embedding file; vectors stay on disk until `read` asks for them."""

    path: Path
    accessions: list[str]  # group names without the 'accession_' prefix, in file order
    sequences: list[str | None]  # clean (core.sequences.clean): whitespace, digits, gaps removed
    layers: dict[LayerKey, LayerEntries]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (group, reason)
    attrs: dict = field(default_factory=dict)

    def type_ids(self) -> list[int]:
        return sorted({type_id for type_id, _ in self.layers})

    def layer_indices(self, type_id: int) -> list[int | None]:
        """Layers present for a model; legacy (None) last."""
        found = [layer for t, layer in self.layers if t == type_id]
        return sorted(found, key=lambda k: (k is None, k if k is not None else 0))

    def read(self, key: LayerKey, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of `key` as float32, shape (n, dim), with the catalogue rows they belong to.

        `rows` restricts (and orders) the result to those catalogue rows. Raises
        `EmbeddingFileError` naming the accession when a vector's length differs from the
        first one's, or when a value is NaN or infinite.
        """
        entries = self.layers.get(key)
        if entries is None:
            raise EmbeddingFileError(f"{self.path}: no embeddings for {describe_key(key)}")
        positions = np.arange(len(entries.rows))
        if rows is not None:
            where = {int(r): i for i, r in enumerate(entries.rows)}
            missing = [int(r) for r in rows if int(r) not in where]
            if missing:
                names = ", ".join(self.accessions[r] for r in missing[:5])
                raise EmbeddingFileError(f"{self.path}: no {describe_key(key)} for {names}")
            positions = np.fromiter((where[int(r)] for r in rows), dtype=np.int64, count=len(rows))
        dims = entries.dims[positions]
        if len(dims):
            expected = int(entries.dims[0])
            bad = np.flatnonzero(dims != expected)
            if len(bad):
                row = int(entries.rows[positions[bad[0]]])
                raise EmbeddingFileError(
                    f"{self.path}: group {ACCESSION_PREFIX}{self.accessions[row]} has a "
                    f"{int(dims[bad[0]])}-dim vector for {describe_key(key)}, expected {expected} "
                    f"like {ACCESSION_PREFIX}{self.accessions[int(entries.rows[0])]}"
                )
        matrix = self._gather(key, entries, positions)
        finite = np.isfinite(matrix).all(axis=1)
        if not finite.all():
            row = int(entries.rows[positions[np.flatnonzero(~finite)[0]]])
            raise EmbeddingFileError(
                f"{self.path}: group {ACCESSION_PREFIX}{self.accessions[row]} has NaN or "
                f"infinite values in {describe_key(key)}"
            )
        return matrix, entries.rows[positions]

    def read_valid(
        self,
        key: LayerKey,
        dim: int | None = None,
        metric: str | None = None,
        trusted: set[str] = frozenset(),
    ) -> tuple[np.ndarray, np.ndarray, list[tuple[str, str]]]:
        """Every usable vector of `key`, and the groups left out with the reason.

        Unlike `read`, one bad query does not stop the others: a vector whose length is not `dim`
        (default: the most common length in the file) or that holds NaN or infinite values is
        left out and reported as (group, reason), and so is one the metric's search refuses
        (`_REFUSED`). Returns (vectors, rows, skipped). A vector of length `dim` whose accession
        is in `trusted` (the caller knows these bytes were usable under `metric`) is taken as
        usable unread: its row of the matrix is left zero.
        """
        entries = self.layers.get(key)
        if entries is None:
            raise EmbeddingFileError(f"{self.path}: no embeddings for {describe_key(key)}")
        if dim is None and len(entries.dims):
            lengths, counts = np.unique(entries.dims, return_counts=True)
            dim = int(lengths[np.argmax(counts)])  # ties: the shorter length, deterministically
        reasons = {  # by position in the file, so the report follows the file's order
            int(p): f"{describe_key(key)} has {int(entries.dims[p])} values, expected {dim}"
            for p in np.flatnonzero(entries.dims != dim)
        }
        keep = np.flatnonzero(entries.dims == dim)
        unread = np.array([self.accessions[r] in trusted for r in entries.rows[keep].tolist()], dtype=bool)
        if unread.any():
            matrix = np.zeros((len(keep), dim or 0), dtype=np.float32)
            matrix[~unread] = self._gather(key, entries, keep[~unread])
        else:
            matrix = self._gather(key, entries, keep)  # no copy: the full run reads every vector
        bad = np.zeros(len(keep), dtype=bool)  # the rows found unusable; a trusted row never is
        bad[~unread] = ~np.isfinite(matrix[~unread] if unread.any() else matrix).all(axis=1)
        reasons.update({int(p): f"{describe_key(key)} has NaN or infinite values" for p in keep[bad]})
        refused = _REFUSED.get(metric)  # the metric's own refusals of finite vectors
        if refused is not None:
            out = ~unread & ~bad
            out[out] = refused[0](matrix[out] if not out.all() else matrix)
            reasons.update({int(p): f"{describe_key(key)} {refused[1]}" for p in keep[out]})
            bad |= out
        skipped = [(self.group(int(entries.rows[p])), reasons[p]) for p in sorted(reasons)]
        if bad.any():
            matrix, keep = matrix[~bad], keep[~bad]
        return matrix, entries.rows[keep], skipped

    def group(self, row: int) -> str:
        """The HDF5 group name of catalogue row `row`."""
        return f"{ACCESSION_PREFIX}{self.accessions[row]}"

    def _gather(self, key: LayerKey, entries: LayerEntries, positions: np.ndarray) -> np.ndarray:
        dim = int(entries.dims[positions[0]]) if len(positions) else entries.dim
        out = np.empty((len(positions), dim), dtype=np.float32)
        if not len(positions):
            return out
        offsets = entries.offsets[positions]
        codes = entries.dtype_codes[positions]
        fast = (offsets >= 0) & (codes >= 0)
        if fast.any():
            itemsizes = np.array([d.itemsize for d in _NATIVE_LIST])[codes[fast]]
            with open(self.path, "rb") as handle:
                if int((offsets[fast] + dim * itemsizes).max()) > os.fstat(handle.fileno()).st_size:
                    raise EmbeddingFileError(f"{self.path}: file is truncated (vector data past its end)")
                # one contiguous copy per vector, read in place from a memory map: a vectorised
                # gather needs an index entry per element and costs 4-6 times more (20,000 × 1,024)
                with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
                    for i, offset, code in zip(
                        np.flatnonzero(fast).tolist(),
                        offsets[fast].tolist(),
                        codes[fast].tolist(),
                        strict=True,
                    ):
                        out[i] = np.frombuffer(view, _NATIVE_LIST[code], dim, offset)
        slow = np.flatnonzero(~fast)
        if len(slow):
            import h5py

            with h5py.File(self.path, "r") as handle:
                for i in slow:
                    row = int(entries.rows[positions[i]])
                    try:
                        out[i] = np.asarray(handle[_dataset_path(self.accessions[row], key)][()]).ravel()
                    except (OSError, RuntimeError, KeyError, ValueError) as exc:  # damaged chunks
                        raise EmbeddingFileError(
                            f"{self.path}: group {self.group(row)}: {describe_key(key)} unreadable ({exc})"
                        ) from exc
        return out


# per metric: which finite vectors its search refuses, and why (`EmbeddingCatalogue.read_valid`)
_REFUSED = {
    "cosine": (directionless, "is a zero vector (or too close to zero): no direction, so no cosine distance"),
    "euclidean": (euclidean_refused, "has a norm ≥ 2^56: its squared distances would overflow float32"),
}


def describe_key(key: LayerKey) -> str:
    """`type_<id>/layer_<k>`, or `type_<id>/embedding` for a legacy entry: where a vector lives."""
    type_id, layer = key
    return f"type_{type_id}/" + (f"layer_{layer}" if layer is not None else "embedding")


def _dataset_path(accession: str, key: LayerKey) -> str:
    type_id, layer = key
    base = f"{ACCESSION_PREFIX}{accession}/{TYPE_PREFIX}{type_id}"
    return f"{base}/embedding" if layer is None else f"{base}/{LAYER_PREFIX}{layer}/embedding"


def _scan_groups(path: str, names: list[str], fast: FastLayout | None = None) -> dict:
    """Scan a slice of the file's accession groups (runs in a worker process for big files).

    With `fast`, the groups are first read by `FastLayout.groups`; only the groups it declines go
    through the HDF5 library.
    """
    import h5py

    accessions: list[str] = []
    sequences: list[str | None] = []
    entries: dict[LayerKey, list[tuple[int, int, int, int]]] = {}
    skipped: list[tuple[str, str]] = []
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDONLY)
    root = h5py.h5g.open(fid, b"/")
    guard = fast if fast is not None else FastLayout.open(path)  # `h5heaps`' checks, before h5py reads
    try:
        direct: list = [None] * len(names)  # what `fast` read of each group, decoded together
        if fast is not None:
            picked = [i for i, n in enumerate(names) if isinstance(n, str) and n.startswith(ACCESSION_PREFIX)]
            addresses = [link_address(root, names[i]) for i in picked]
            for i, found in zip(picked, fast.groups(addresses), strict=True):
                direct[i] = found
        for name, found in zip(names, direct, strict=True):
            if not isinstance(name, str):  # h5py hands names that are not UTF-8 over as bytes
                skipped.append((name.decode("utf-8", "replace"), "group name is not UTF-8 text"))
                continue
            if not name.startswith(ACCESSION_PREFIX):
                skipped.append((name, f"not an '{ACCESSION_PREFIX}<ID>' group"))
                continue
            if not name[len(ACCESSION_PREFIX) :].strip():  # no id: nothing to name its outputs by
                skipped.append((name, f"an empty accession (nothing after '{ACCESSION_PREFIX}')"))
                continue
            try:
                found = (*found, []) if isinstance(found, tuple) else found or scan_group(fid, name, guard)
            except (KeyError, ValueError, TypeError, RuntimeError, OSError) as exc:
                # a damaged object inside the group: the group is left out, the file still read
                skipped.append((name, f"unreadable HDF5 content ({exc})"))
                continue
            if isinstance(found, str):
                skipped.append((name, found))
                continue
            sequence, vectors, group_skips = found
            row = len(accessions)
            accessions.append(name[len(ACCESSION_PREFIX) :])
            sequences.append(sequence)
            skipped.extend(group_skips)
            for key, entry in vectors:
                entries.setdefault(key, []).append((row, *entry))
    finally:
        fid.close()
        if guard is not None and guard is not fast:
            guard.close()
    return {"accessions": accessions, "sequences": sequences, "entries": entries, "skipped": skipped}


def _check_is_file(path: Path) -> None:
    if not path.exists():
        raise EmbeddingFileError(f"{path}: no such file")
    if not path.is_file():
        raise EmbeddingFileError(f"{path}: not a file (a folder?)")


def scan(path: str | Path, workers: int | None = None) -> EmbeddingCatalogue:
    """Scan an embedding HDF5 file into a catalogue (structure, sequences, vector locations).

    Raises `EmbeddingFileError` naming the file when it is not a readable HDF5 file.
    Groups without a `sequence` dataset (and other unusable groups) are recorded in
    `catalogue.skipped` with the reason, and logged as warnings.
    """
    import h5py

    path = Path(path)
    _check_is_file(path)
    fast = FastLayout.open(path)
    try:
        with h5py.File(path, "r") as handle:
            names = list(handle.keys())
            if fast is not None and (damage := endless_attributes(fast, h5py.h5o.get_info(handle.id).addr)):
                raise ValueError(f"its attributes: {damage}")  # h5py would never return
            attrs = {k: _plain(v) for k, v in handle.attrs.items()}
    except (OSError, RuntimeError, ValueError, KeyError) as exc:  # h5py's errors of damaged files
        if fast is not None:
            fast.close()
        hint = fasta_named_otherwise(path)
        raise EmbeddingFileError(f"{path}: not a readable HDF5 file ({exc}){hint}") from exc
    workers = workers if workers is not None else min(os.cpu_count() or 1, 8)
    parts = []
    try:
        if fast is not None:  # ~0.1 ms a group: one process is faster than starting workers
            with fast:  # unless the first groups show that h5py must read most of them anyway
                parts.append(_scan_groups(str(path), names[:_FAST_PROBE], fast))
                rest, names = names[_FAST_PROBE:], []
                if fast.declined * 2 <= _FAST_PROBE:
                    parts.append(_scan_groups(str(path), rest, fast))
                else:
                    names = rest
        if workers > 1 and len(names) >= _PARALLEL_SCAN_MIN_GROUPS:
            size = -(-len(names) // (workers * 4))
            slices = [names[i : i + size] for i in range(0, len(names), size)]
            # forkserver: workers fork from a clean single-threaded server, never from this process,
            # whose threads (Dagster's gRPC server, torch) could hold locks a forked child inherits
            from concurrent.futures import ProcessPoolExecutor  # only here: multiprocessing is ≈ 6 ms
            from multiprocessing import get_context

            context = get_context("forkserver")
            context.set_forkserver_preload([__name__])
            with ProcessPoolExecutor(workers, mp_context=context) as pool:
                parts += pool.map(_scan_groups, [str(path)] * len(slices), slices)
        elif names:
            parts.append(_scan_groups(str(path), names))
        catalogue = _merge(path, parts, attrs)
    except (OSError, RuntimeError) as exc:
        raise EmbeddingFileError(f"{path}: unreadable HDF5 content ({exc})") from exc
    for group, reason in catalogue.skipped:
        log.warning("%s: skipped %s: %s", path, group, reason)
    declined = "no direct reader" if fast is None else f"{fast.declined} declined by the direct reader"
    log.debug("%s: %d groups scanned (%s)", path, len(catalogue.accessions), declined)
    return catalogue


def _merge(path: Path, parts: Iterable[dict], attrs: dict) -> EmbeddingCatalogue:
    accessions: list[str] = []
    sequences: list[str | None] = []
    collected: dict[LayerKey, list[np.ndarray]] = {}
    skipped: list[tuple[str, str]] = []
    for part in parts:
        base = len(accessions)
        accessions.extend(part["accessions"])
        sequences.extend(part["sequences"])
        skipped.extend(part["skipped"])
        for key, rows in part["entries"].items():
            block = np.asarray(rows, dtype=np.int64).reshape(-1, 4)
            block[:, 0] += base
            collected.setdefault(key, []).append(block)
    layers = {}
    for key in sorted(collected, key=lambda k: (k[0], k[1] is None, k[1] or 0)):
        block = np.concatenate(collected[key])
        layers[key] = LayerEntries(
            rows=block[:, 0].copy(),
            offsets=block[:, 1].copy(),
            dims=block[:, 2].copy(),
            dtype_codes=block[:, 3].astype(np.int8),
        )
    return EmbeddingCatalogue(path, accessions, sequences, layers, skipped, attrs)


def _plain(value):
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def scan_cached(path: str | Path, cache_dir: Path) -> tuple[EmbeddingCatalogue, str]:
    """`scan`, remembered per file content: (catalogue, content digest).

    Scanning costs ~0.4 ms per protein in the HDF5 library; hashing the file costs a few ms
    per MiB, so a file already seen is recognised by its digest and not scanned again.
    """
    path = Path(path)
    _check_is_file(path)
    try:
        digest = file_digest(path)
    except OSError as exc:
        raise EmbeddingFileError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    cached = Path(cache_dir) / f"catalogue-v{_CATALOGUE_FORMAT}-{digest}.pkl"
    if cached.exists():
        try:
            with open(cached, "rb") as handle:
                catalogue = pickle.load(handle)
            catalogue.path = path
            log.debug("%s: groups from the scan cache %s", path, cached)
            return catalogue, digest
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError):
            log.warning("unreadable catalogue cache %s; scanning %s again", cached, path)
    catalogue = scan(path)
    atomic_write(
        cached, lambda tmp: tmp.write_bytes(pickle.dumps(catalogue, protocol=pickle.HIGHEST_PROTOCOL))
    )
    return catalogue, digest
