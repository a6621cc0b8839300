"""The reference side of the k-NN engine (`knn`): the matrix as screened and as refined.

The *reference values* are the rows as given, widened to float32 (exactly, for the float16 rows
the database stores as halfvec); cosine divides each by its norm in float32, row × fl(1/‖row‖)
with the norm in float64. Everything the engine computes derives from those prepared rows.

What is held, so that a million references fit in a few GiB:

* the source: the caller's array, not copied when it is float16 or float32 and C-contiguous; a
  read-only ``np.memmap`` (the reference cache) stays on disk and is read block by block;
* per row: the float64 norms the bound needs, and for cosine the float32 scale fl(1/‖row‖);
* the screen's operands, prepared once at build: 16-bit rows (2 bytes an element) for a 16-bit
  screen, or int8 rows and the float32 factor they share (`screen.ScaledRows`) for the int8 screen,
  after which a memmapped source's pages are unmapped from the process (`release_rows`: only
  refinement's few candidate rows are read again, so the matrix is not resident twice); for the
  float32 screen the prepared float32 rows, except for a memmapped source, whose float32
  operands are made again block by block at each search (never the whole matrix in float32);
  `float32_view` is that float32 screen of rows held for another, made per block as well;
* on CUDA, the source is also placed on the device, where the build reads it and refinement
  gathers from it: an in-memory one whole, a memmapped one a chunk at a time (its pages
  released as they go) when it takes at most `_CARD_SHARE` of the card's free memory; a larger
  one stays on disk and is read as on the CPU.

Refinement gathers the prepared rows of its few candidates from the source, with the very
arithmetic of the build (float32 widening, one float32 product by the scale), so the memmapped
and the in-memory matrix give bit-identical answers.

**Kept operands.** A 16-bit screen's operands, per-row scales and norms are a function of the
rows alone, so a caller that vouches for the rows (the reference cache: a file holds the rows of
its fingerprint and nothing else) may pass a path prefix, `kept`: the build then reads them from
there, memory-mapped, instead of preparing them again (a million references: a billion elements
converted, 4–5.5 s of a warm lookup on two cores), or prepares them and writes them there for
the next build. Three files, each written atomically: the operands (.npy, uint16 bits), the per-row float32 scale and
squared norm (.rows.npy), and last the description (.json: a tag naming the preparation, its
format, the arithmetic, shape and source type; the bound's maxima; the euclidean centre), without
which the others are not read. A kept file is used only if its tag matches (it names a digest of
the preparing code and the numpy and torch versions, so any change to them prepares afresh) and
a sample of rows (`_KEPT_SAMPLE`, spread over the matrix) prepared again now gives the same bits;
anything else is prepared afresh and written again. Rows outside the sample are trusted as the
cache file's own rows are: a file altered on disk there would go unnoticed. On the CPU only
(CUDA holds its operands on the card).
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import torch

from . import screen
from .knn_choice import largest_unit_component
from .knn_inputs import in_parallel, inverse_norms, row_sq_norms
from .resident import onto_card, release_rows
from .units import single_threaded

# Rows prepared per chunk at build: on the CPU the float32 temporaries (1 MiB at 1,024 dims) stay
# in a core's cache through the chunk's dozen passes (2,048 rows: 8 MiB each, 40% slower); a
# CUDA chunk is larger, so that kernel launches do not dominate; the mean row (euclidean 16-bit
# screens) is summed in 2,048-row chunks, the order its float64 sum has always had.
_PREPARE_ROWS = {"cpu": 256, "cuda": 2048}
_MEAN_ROWS = 2048
# Bytes of float64 reference rows refined per chunk (as many again of query rows): both stay in
# a core's L2 cache between the gather and the dot products (measured at 1,024 dims: 64 pairs a
# chunk refine a quarter faster than 256).
_REFINE_BYTES = 2**19
# The share of a card's free memory a memmapped source may take there (module docstring)
_CARD_SHARE = 0.25
# Kept operands (module docstring): the format, bumped whenever the preparation of operands,
# scales or norms changes; and the rows prepared again to check a kept file against its source.
_KEPT_FORMAT = 2
_KEPT_SAMPLE = 64

log = logging.getLogger(__name__)
_WRITING: dict[Path, threading.Thread] = {}  # kept files this process is writing (`_keep`)
_WRITING_LOCK = threading.Lock()


class PreparedReferences:
    """The reference rows of one engine, prepared for `metric`, `arithmetic` and `device`; the
    int8 screen's shared factor from `largest` (`knn_choice.largest_unit_component`, measured
    here when not given)."""

    def __init__(
        self,
        matrix: np.ndarray,
        metric: str,
        arithmetic: screen.Arithmetic,
        device: torch.device,
        kept: Path | None = None,
        largest: float | None = None,
    ):
        if matrix.dtype in (np.float16, np.float32) and matrix.flags.c_contiguous:
            source = matrix  # kept as given: a memmap stays a memmap
        else:
            source = np.ascontiguousarray(matrix, dtype=np.float32)
        self.source = source
        self.metric = metric
        self.arithmetic = arithmetic
        self.device = device
        self.shape = source.shape
        self.streamed = isinstance(source, np.memmap)
        self._scale_host = self._scale = None  # cosine: float32 fl(1/‖row‖), host and device
        self._on_device = None  # CUDA: the source on the card, where the build reads and refinement gathers
        self.centre = None  # euclidean 16-bit screens: the mean prepared row (`knn_bounds`)
        self.operand_scale = None  # the int8 screen: each operand row's float32 factor d
        self.restored = False  # whether the operands were read from `kept` (module docstring)
        keep = kept is not None and arithmetic.half and device.type == "cpu"
        if keep and self._restore(kept):
            return
        sq_norms = row_sq_norms(source, "references", metric, torch.get_num_threads())
        if metric == "cosine":
            self._scale_host = inverse_norms(sq_norms).astype(np.float32)
            self._scale = torch.from_numpy(self._scale_host).to(device)
        if device.type == "cuda" and not self.streamed:
            self._on_device = torch.from_numpy(_writable(source)).to(device)
        elif device.type == "cuda" and source.nbytes <= _CARD_SHARE * torch.cuda.mem_get_info(device)[0]:
            self._on_device = onto_card(source, device)  # refinement's gathers stay on the card
        if arithmetic.half and metric == "euclidean":
            self.centre = self._mean_row()
        if arithmetic.dtype == torch.int8 and largest is None:
            largest = largest_unit_component(source)
        self.operands, self.sq_norms, self.stats = self._prepare_operands(largest)
        if keep:
            self._keep(kept)

    @property
    def n(self) -> int:
        return self.shape[0]

    @property
    def dim(self) -> int:
        return self.shape[1]

    def streamed_bytes_per_row(self) -> int:
        """Extra bytes a screened block costs per reference row when operands are made per search."""
        return 0 if self.operands is not None else self.dim * (4 + self.source.itemsize)

    def prepared(self, start: int, stop: int) -> torch.Tensor:
        """Prepared float32 rows [start, stop) on the device (a fresh tensor)."""
        if self._on_device is not None:
            rows = self._on_device[start:stop].to(torch.float32, copy=True)
        else:
            rows = _to_float32(self.source[start:stop], self.device)
        if self._scale is not None:
            rows *= self._scale[start:stop, None]
        return rows

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """Prepared float32 rows of `indices` (int64, on the device), bit-identical to `prepared`."""
        if self._on_device is None:
            return torch.from_numpy(self.host_rows(indices.cpu().numpy())).to(self.device)
        rows = self._on_device.index_select(0, indices).to(torch.float32)
        if self._scale is not None:
            rows *= self._scale[indices, None]
        return rows

    def host_rows(self, indices: np.ndarray) -> np.ndarray:
        """Prepared float32 rows of `indices` from the host source, in numpy: single-threaded, so
        that the many small gathers of refinement wait on no thread pool (on a loaded machine
        each parallel region of a small op can cost a scheduler time slice)."""
        rows = self.source[indices].astype(np.float32, copy=False)  # fancy indexing copies
        if self._scale_host is not None:
            rows *= self._scale_host[indices, None]  # the float32 product of `prepared`
        return rows

    def exact_distances(self, queries: np.ndarray, query_rows: np.ndarray, indices: np.ndarray) -> np.ndarray:
        """Float64 distances (n,) of the pairs (queries[query_rows[i]], reference indices[i]):
        cosine clip(1 - q̂·r̂, 0, 2) of the unit queries `queries` (b, dim) float64, euclidean
        ‖q - r‖ of the float32 queries widened, r the prepared rows (`host_rows`) in float64.

        Each pair's value is numpy's float64 ``einsum("ij,ij->i")`` of two C-contiguous rows,
        whose sum runs along the row in one fixed order whatever the rows' count or place in
        memory, so a value depends on its pair alone. Pairs go a chunk at a time through two
        reused float64 buffers small enough to stay in the core's cache, and each reference row
        is scaled in float32 and widened in one pass (`np.multiply` into the float64 buffer):
        the same float32 product as `host_rows`, widened exactly."""
        chunk = max(8, _REFINE_BYTES // (8 * self.dim))
        candidates, query = np.empty((2, min(chunk, len(indices)), self.dim))
        out = np.empty(len(indices))
        for start in range(0, len(indices), chunk):
            chosen = indices[start : start + chunk]
            n = len(chosen)
            rows, gathered = candidates[:n], self.source[chosen]
            if gathered.dtype != np.float32:  # exactly; torch widens float16 twice as fast as numpy
                gathered = torch.from_numpy(gathered).float().numpy()
            if self._scale_host is not None:
                np.multiply(gathered, self._scale_host[chosen, None], out=rows, dtype=np.float32)
            else:
                rows[...] = gathered
            np.take(queries, query_rows[start : start + chunk], axis=0, out=query[:n], mode="clip")
            if self.metric == "cosine":
                np.einsum("ij,ij->i", rows, query[:n], out=out[start : start + n])
            else:
                rows -= query[:n]
                np.einsum("ij,ij->i", rows, rows, out=out[start : start + n])
        if self.metric == "cosine":
            return np.clip(1.0 - out, 0.0, 2.0, out=out)
        return np.sqrt(out, out=out)

    def float32_view(self) -> PreparedReferences:
        """These rows as cosine's float32 screen on the CPU sees them, sharing everything held:
        its operands are the prepared rows made block by block (`prepared`), whose norms are
        bounded, not measured (`screen.to_operands`, unit rows), so nothing is prepared now."""
        view = copy.copy(self)
        view.arithmetic, view.operands, view.operand_scale = screen.FP32, None, None
        view.stats = {"norm": screen.UNIT_ROW_NORM, "operand_norm": screen.UNIT_ROW_NORM, "residual": 0.0}
        view.stats.update(relative_residual=math.inf, centred=0.0)
        return view

    def operand_scales(self, start: int, stop: int) -> torch.Tensor:
        """The int8 screen's factors d of operand rows [start, stop) (`screen.ScaledRows`)."""
        return self.operand_scale[start:stop]

    def operand_block(self, start: int, stop: int) -> torch.Tensor:
        """The screen's operands of rows [start, stop): held, or made now for a memmap's float32
        screen exactly as the build measured them."""
        if self.operands is not None:
            return self.operands[start:stop]
        return self.prepared(start, stop)

    def _kept_files(self, kept: Path) -> tuple[Path, Path, Path]:
        """(operands, rows, description) of the kept files under prefix `kept` for this engine."""
        stem = f"{kept.name}.{self.metric}-{self.arithmetic.name}"
        return tuple(kept.with_name(stem + suffix) for suffix in (".npy", ".rows.npy", ".json"))

    def _kept_tag(self) -> str:
        """What a kept file must have been prepared as to be used (module docstring): its format,
        the code that prepares (`_preparation_code`), the arithmetic, shape and source type."""
        a = self.arithmetic
        arithmetic = f"{a.name}:{a.accumulation_unit!r}:{a.output_unit!r}:{a.smallest_normal!r}"
        return (
            f"{_KEPT_FORMAT}|{_preparation_code()}|{self.metric}|{arithmetic}|{self.n}x{self.dim}|"
            f"{self.source.dtype.str}"
        )

    def _restore(self, kept: Path) -> bool:
        """Take the operands, scales, norms and maxima from the kept files when they are this
        preparation's and a sample of rows checks out (module docstring); False otherwise."""
        operands_file, rows_file, description_file = self._kept_files(kept)
        with _WRITING_LOCK:
            writing = _WRITING.get(operands_file)
        if writing is not None:  # this process is writing them: they will be whole
            writing.join()
        try:
            description = json.loads(description_file.read_text(encoding="utf-8"))
            if description.get("tag") != self._kept_tag():
                return False
            rows = np.load(rows_file)
            operands = np.load(operands_file, mmap_mode="c")  # writable for torch, never written
        except (OSError, ValueError, EOFError, AttributeError):
            return False
        scaled = self.arithmetic.dtype == torch.int8
        if (
            rows.dtype != np.float32
            or rows.shape != (self.n, 2)
            or operands.dtype != (np.int8 if scaled else np.uint16)
            or operands.shape != self.shape
        ):
            return False
        try:
            stats = {name: float(description["stats"][name]) for name in _STAT_NAMES}
            centre = description["centre"]
            if (centre is None) != (self.metric == "cosine"):
                return False
            self.centre = None if centre is None else torch.tensor(centre, dtype=torch.float32)
        except (KeyError, TypeError, ValueError):
            return False
        if self.centre is not None and self.centre.shape != (self.dim,):
            self.centre = None
            return False
        if scaled:  # cosine: the second column holds the factor, one for every row
            if len(rows) and not np.all(rows[:, 1] == rows[0, 1]):
                return False
            self.operands = torch.from_numpy(operands)
            self.operand_scale = torch.from_numpy(np.ascontiguousarray(rows[:, 1]))
        else:
            self.operands = torch.from_numpy(operands.view(np.int16)).view(self.arithmetic.dtype)
        self.stats = stats
        self.sq_norms = (
            torch.from_numpy(np.ascontiguousarray(rows[:, 1])) if self.metric == "euclidean" else None
        )
        if self.metric == "cosine":
            self._scale_host = np.ascontiguousarray(rows[:, 0])
            self._scale = torch.from_numpy(self._scale_host)
        if not self._sample_matches():
            self.operands = self.sq_norms = self._scale_host = self._scale = self.centre = None
            self.operand_scale = None
            return False
        self.restored = True
        log.info("screening operands read from %s", operands_file)
        return True

    def _sample_matches(self) -> bool:
        """Whether rows spread over the matrix, prepared again from the source exactly as the
        build prepares them, give the kept scale, operand bits, squared norm and stay within the
        kept maxima."""
        rows = np.unique(np.linspace(0, self.n - 1, min(self.n, _KEPT_SAMPLE)).astype(np.int64))
        cosine = self.metric == "cosine"
        with single_threaded():
            for row in rows.tolist():
                try:
                    sq_norm = row_sq_norms(self.source[row : row + 1], "references", self.metric)
                except ValueError:
                    return False
                if cosine:
                    scale = inverse_norms(sq_norm).astype(np.float32)
                    if scale.view(np.uint32)[0] != self._scale_host[row : row + 1].view(np.uint32)[0]:
                        return False
                factor = None if self.operand_scale is None else float(self.operand_scale[0])
                operand, stats = screen.to_operands(
                    self.prepared(row, row + 1),
                    self.arithmetic,
                    self.centre,
                    unit_rows=cosine,
                    int8_factor=factor,
                )
                if isinstance(operand, screen.ScaledRows):  # the int8 screen: values and factor
                    kept_factor = self.operand_scale[row : row + 1]
                    if not torch.equal(operand.scale.view(torch.int32), kept_factor.view(torch.int32)):
                        return False
                    operand = operand.values
                if not torch.equal(_bits(operand), _bits(self.operands[row : row + 1])):
                    return False
                if any(stats[name][0] > self.stats[name] for name in ("norm", "operand_norm", "residual")):
                    return False
                if not cosine and (stats["norm"] ** 2).astype(np.float32)[0] != float(self.sq_norms[row]):
                    return False
        return True

    def _keep(self, kept: Path) -> None:
        """Write the prepared operands, scales, norms and maxima as the kept files (module
        docstring) on a thread of their own, while the search runs: at a million references the
        operands are 2 GiB, seconds of disk writes the search need not wait for. A build of the
        same files in this process waits for them (`_restore`). A cache: a failure to write is
        logged and the search goes on."""
        operands_file, rows_file, description_file = self._kept_files(kept)
        rows = np.zeros((self.n, 2), dtype=np.float32)
        if self._scale_host is not None:
            rows[:, 0] = self._scale_host
        if self.sq_norms is not None:
            rows[:, 1] = self.sq_norms.cpu().numpy()
        if self.operand_scale is not None:  # the int8 screen, cosine: no squared norms
            rows[:, 1] = self.operand_scale.numpy()
        description = {
            "tag": self._kept_tag(),
            "stats": {name: self.stats[name] for name in _STAT_NAMES},
            "centre": None if self.centre is None else self.centre.cpu().tolist(),
        }
        if self.operand_scale is not None:  # int8: as they are
            bits = self.operands.numpy()
        else:
            bits = self.operands.view(torch.int16).numpy().view(np.uint16)  # the operands, not copied

        def write() -> None:
            from .exports import atomic_write

            try:
                for path, array in ((operands_file, bits), (rows_file, rows)):
                    atomic_write(path, lambda tmp, array=array: _save_npy(tmp, array))
                text = json.dumps(description, sort_keys=True)  # last: the files are whole
                atomic_write(description_file, lambda tmp: tmp.write_text(text, encoding="utf-8"))
            except OSError as error:  # the writer's OutputWriteError is one
                log.warning("screening operands not kept at %s (%s)", operands_file, error)
            finally:
                with _WRITING_LOCK:
                    _WRITING.pop(operands_file, None)

        writer = threading.Thread(target=write, name="keep-operands")
        with _WRITING_LOCK:
            _WRITING[operands_file] = writer
        writer.start()

    def _mean_row(self) -> torch.Tensor:
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        for start in range(0, self.n, _MEAN_ROWS):
            total += self.prepared(start, min(start + _MEAN_ROWS, self.n)).double().sum(0)
        return (total / self.n).float()

    def _prepare_operands(
        self, largest: float | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, dict[str, float]]:
        """(operands or None when made per block, euclidean w_j = fl(‖z_j‖²) or None, the bound's
        maxima over references), chunk by chunk so that no float32 copy of a memmap exists; on
        the CPU on torch's thread count of worker threads (`knn_inputs.in_parallel`): every value
        is row-local, so neither the chunks nor the workers change one bit of the result.
        `largest`: the int8 screen's bound on its unit rows' largest component."""
        factor = None if largest is None else screen.shared_int8_factor(largest)
        n, dim, arithmetic = self.n, self.dim, self.arithmetic
        shared = None  # the float32 euclidean screen on the CPU reads the rows themselves
        if not arithmetic.half and self.metric == "euclidean" and self.device.type == "cpu":
            shared = (
                None
                if self.streamed or self.source.dtype != np.float32
                else torch.from_numpy(_writable(self.source))
            )
        held = shared is None and (arithmetic.half or not self.streamed)
        operands = torch.empty((n, dim), dtype=arithmetic.dtype, device=self.device) if held else shared
        if arithmetic.dtype == torch.int8:
            self.operand_scale = torch.empty(n, dtype=torch.float32, device=self.device)
        stats = {name: np.empty(n) for name in ("norm", "operand_norm", "residual")}

        rows = _PREPARE_ROWS["cpu" if self.device.type == "cpu" else "cuda"]

        def prepare(first: int, last: int) -> None:
            with single_threaded():  # on the CPU, the workers of `in_parallel` share the cores
                for start in range(first, last, rows):
                    stop = min(start + rows, last)
                    chunk, chunk_stats = screen.to_operands(
                        self.prepared(start, stop), arithmetic, self.centre,
                        unit_rows=self.metric == "cosine", int8_factor=factor,
                    )  # fmt: skip
                    if isinstance(chunk, screen.ScaledRows):
                        chunk, self.operand_scale[start:stop] = chunk.values, chunk.scale
                    if held:
                        operands[start:stop] = chunk
                        release_rows(self.source, start, stop)  # refinement alone reads them again
                    for name, values in chunk_stats.items():
                        stats[name][start:stop] = values

        in_parallel(n, torch.get_num_threads() if self.device.type == "cpu" else 1, prepare)
        sq_norms = None
        if self.metric == "euclidean":
            sq_norms = torch.from_numpy((stats["norm"] ** 2).astype(np.float32)).to(self.device)
        maxima = {name: float(values.max()) for name, values in stats.items()}
        relative = math.inf  # κ - 1, which the cosine bound does not use: there "norm" is a bound
        if self.metric == "euclidean":
            ratios = np.divide(stats["residual"], stats["norm"], out=np.zeros(n), where=stats["norm"] > 0)
            relative = float(ratios.max())
        maxima.update(relative_residual=relative, centred=float(self.centre is not None))
        return operands, sq_norms, maxima


@functools.cache
def _preparation_code() -> str:
    """A digest of what decides a prepared row's bits: the modules that prepare (this one, the
    norms of `knn_inputs`, the rounding of `screen`) and the numpy and torch that run them (an
    einsum's order of summation, a conversion's rounding). Any edit invalidates kept files."""
    digest = hashlib.sha256(f"numpy {np.__version__} torch {torch.__version__}".encode())
    try:
        for module in ("knn_reference.py", "knn_inputs.py", "screen.py"):
            digest.update(b"\0" + (Path(__file__).parent / module).read_bytes())
    except OSError:  # no sources to read (a frozen install): a tag no kept file can have
        return f"unread-{os.getpid()}-{time.monotonic_ns()}"
    return digest.hexdigest()[:16]


def wait_until_kept() -> None:
    """Wait until this process's kept files (`PreparedReferences._keep`) are written."""
    with _WRITING_LOCK:
        writers = list(_WRITING.values())
    for writer in writers:
        writer.join()


_STAT_NAMES = ("norm", "operand_norm", "residual", "relative_residual", "centred")


def _bits(operands: torch.Tensor) -> torch.Tensor:
    """Operands as integers of their width, compared bit for bit (-0 and NaN included)."""
    return operands if operands.dtype == torch.int8 else operands.view(torch.int16)


def _save_npy(path: Path, array: np.ndarray) -> None:
    """`array` as a .npy at `path` exactly (np.save to a path would add ".npy" to the name)."""
    with open(path, "wb") as handle:
        np.save(handle, array)


def _writable(array: np.ndarray) -> np.ndarray:
    """`array` itself when torch may share it, else a copy (torch refuses read-only memory)."""
    return array if array.flags.writeable else np.array(array)


def _to_float32(rows: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host rows (float16 or float32) widened exactly to a float32 tensor on `device` that shares
    no memory with the source."""
    return torch.from_numpy(np.array(rows)).to(device=device, dtype=torch.float32)
