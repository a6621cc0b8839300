"""Inputs and resources of the k-NN engines (`knn`, `knn_numpy`): the exclusion CSR, row norms,
the device and the memory budget, checked with errors that name what is wrong.

torch is imported only by the functions that need a torch device: `knn_numpy` uses the rest
without loading it."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from .device import resolve_device as choose_device
from .resident import release_rows

if TYPE_CHECKING:
    import torch

_BUDGET_FRACTION = 0.25
# Beyond a few hundred MiB per block the per-block overhead is already under 1% of the product's
# time, so larger blocks would only take memory from the rest of the pipeline.
_CPU_BUDGET_CAP = 512 * 2**20
_GPU_BUDGET_CAP = 4 * 2**30
# Rows per chunk of `row_sq_norms`: their float64 copy (2 MiB at 1,024 dims) is reused from the
# core's cache; a fresh 32 MiB copy per 4,096 rows was page-faulted in each time (2x slower)
_NORM_ROWS_PER_CHUNK = 256
MAX_NORM = 2.0**56  # rows at least this long could overflow float32 squares and products

Exclusions = tuple[np.ndarray, np.ndarray]  # (query row, reference index) pairs, int64


def exclusions_for_rows(exclusions: Exclusions, rows: np.ndarray, n_rows: int) -> Exclusions:
    """The exclusion pairs of `rows`, renumbered to positions in `rows`."""
    excluded_rows, excluded_references = exclusions
    position = np.full(n_rows, -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    new_rows = position[excluded_rows]
    kept = new_rows >= 0
    return new_rows[kept], excluded_references[kept]


def validate_exclusions(
    exclude: tuple[np.ndarray, np.ndarray] | None, n_queries: int, n_references: int
) -> tuple[np.ndarray, np.ndarray]:
    """Check the exclusion CSR against the search's shape; returns (indptr, ref_indices) int64."""
    if exclude is None:
        return np.zeros(n_queries + 1, dtype=np.int64), np.zeros(0, dtype=np.int64)
    indptr, excluded = (np.asarray(part) for part in exclude)
    integers = np.issubdtype(indptr.dtype, np.integer) and (
        excluded.size == 0 or np.issubdtype(excluded.dtype, np.integer)
    )
    if not integers or indptr.shape != (n_queries + 1,) or excluded.ndim != 1:
        raise ValueError(
            f"exclude must be (indptr, ref_indices), 1-D integer arrays, indptr of n_queries + 1 "
            f"= {n_queries + 1} entries; got {indptr.dtype} {indptr.shape} and "
            f"{excluded.dtype} {excluded.shape}"
        )
    if indptr[0] != 0 or indptr[-1] != len(excluded) or np.any(np.diff(indptr) < 0):
        raise ValueError("exclude indptr must rise from 0 to len(ref_indices) without decreasing")
    if excluded.size and (excluded.min() < 0 or excluded.max() >= n_references):
        raise ValueError(f"exclude ref_indices must be reference indices, in [0, {n_references})")
    return indptr.astype(np.int64), excluded.astype(np.int64)


def checked_references(references: np.ndarray) -> np.ndarray:
    """`references` as an array, refused with the reason unless a non-empty 2-D float matrix
    (every engine's `build`); an ndarray is returned as is (a memmap stays one)."""
    matrix = references if isinstance(references, np.ndarray) else np.asarray(references)
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"references must be a 2-D (n_ref, dim) matrix, got {matrix.shape}")
    if matrix.shape[0] == 0:
        raise ValueError("the reference set is empty: there is nothing to search")
    if not np.issubdtype(matrix.dtype, np.floating):
        raise ValueError(f"references must be float16 or float32, got {matrix.dtype}")
    return matrix


def search_arguments(
    queries: np.ndarray,
    k: int,
    threshold: float | None,
    exclude: tuple[np.ndarray, np.ndarray] | None,
    n_references: int,
    dim: int,
    metric: str,
    workers: int = 1,
) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A search's arguments checked, for every engine alike (`knn`, `knn_numpy`, `knn_aspect`):
    (n_queries, k, exclusion indptr, excluded reference indices, float32 queries, their
    squared norms, measured by `workers` threads: the same values whatever their count).
    Errors say which argument is wrong."""
    query_matrix = np.asarray(queries)
    if query_matrix.ndim != 2 or query_matrix.shape[1] != dim:
        raise ValueError(f"queries must be (n_q, {dim}) to match, got {query_matrix.shape}")
    if not np.issubdtype(query_matrix.dtype, np.floating):
        raise ValueError(f"queries must be floating point, got {query_matrix.dtype}")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be an integer ≥ 1, got {k!r}")
    if threshold is not None and not threshold >= 0:
        raise ValueError(f"threshold must be None or a distance ≥ 0, got {threshold!r}")
    n_queries = len(query_matrix)
    indptr, excluded = validate_exclusions(exclude, n_queries, n_references)
    q32 = np.ascontiguousarray(query_matrix, dtype=np.float32)
    return n_queries, int(k), indptr, excluded, q32, row_sq_norms(q32, "queries", metric, workers)


def row_sq_norms(matrix: np.ndarray, name: str, metric: str, workers: int = 1) -> np.ndarray:
    """Squared L2 norm of each float32 row, accumulated in float64: (n,), chunk by chunk through
    a float64 buffer per worker thread (numpy's casts and sums release the GIL). Each row's value
    is numpy's ``einsum("ij,ij->i")`` of its float64 copy, whatever the chunks or workers.

    Euclidean rows must be shorter than `MAX_NORM`, so that no float32 square or product of the
    screen overflows (cosine rows are normalised first).
    """
    sq_norms = _sq_norms(matrix, workers)
    if not np.isfinite(sq_norms).all():  # any NaN or inf in a row makes its norm non-finite
        row = int(np.argmin(np.isfinite(sq_norms)))
        raise ValueError(f"{name} contain NaN or infinite values (row {row})")
    if metric == "euclidean" and _too_long(sq_norms).any():
        row = int(np.argmax(sq_norms))
        raise ValueError(f"{name} row {row} has a norm ≥ 2^56: its squared distances overflow float32")
    return sq_norms


def euclidean_refused(matrix: np.ndarray) -> np.ndarray:
    """Rows (bool, n) of a finite matrix that `row_sq_norms` refuses under the euclidean metric,
    measured as it measures them: a caller leaves these rows out instead of failing the search."""
    return _too_long(_sq_norms(matrix, 1))


def directionless(vectors: np.ndarray) -> np.ndarray:
    """Rows (bool, n) whose cosine distance is undefined: norm zero, not finite, or so small that
    its inverse overflows float32 (the search normalises rows in float32)."""
    norms = np.sqrt(np.einsum("ij,ij->i", vectors, vectors, dtype=np.float64))
    return ~np.isfinite(norms) | (norms * float(np.finfo(np.float32).max) <= 1.0)


def _too_long(sq_norms: np.ndarray) -> np.ndarray:
    return sq_norms >= MAX_NORM**2


def _sq_norms(matrix: np.ndarray, workers: int) -> np.ndarray:
    sq_norms = np.empty(len(matrix))

    def measure(first: int, last: int) -> None:
        buffer = np.empty((min(_NORM_ROWS_PER_CHUNK, last - first), matrix.shape[1]))
        for start in range(first, last, _NORM_ROWS_PER_CHUNK):
            stop = min(start + _NORM_ROWS_PER_CHUNK, last)
            chunk = buffer[: stop - start]
            chunk[...] = matrix[start:stop]  # float16/float32 → float64: exact
            np.einsum("ij,ij->i", chunk, chunk, out=sq_norms[start:stop])
            release_rows(matrix, start, stop)

    in_parallel(len(matrix), workers, measure)
    return sq_norms


def in_parallel(n_rows: int, workers: int, work: Callable[[int, int], None]) -> None:
    """`work(first, last)` over `workers` contiguous, nearly equal ranges of rows at once, each in
    its own thread (one range, in this thread, when `workers` ≤ 1 or the rows are few): for
    passes over the reference matrix whose numpy and single-threaded torch steps release the GIL."""
    workers = max(1, min(workers, n_rows // _NORM_ROWS_PER_CHUNK))
    bounds = [n_rows * i // workers for i in range(workers + 1)]
    if workers == 1:
        work(0, n_rows)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="knn-prepare") as pool:
        for done in [pool.submit(work, bounds[i], bounds[i + 1]) for i in range(workers)]:
            done.result()


def inverse_norms(sq_norms: np.ndarray) -> np.ndarray:
    """1/‖x‖ per row (float64); 0 for zero-norm rows, whose normalised form is the zero vector."""
    inverse = np.zeros_like(sq_norms)
    np.divide(1.0, np.sqrt(sq_norms), out=inverse, where=sq_norms > 0)
    return inverse


def resolve_device(backend: str, device: str | None) -> torch.device:
    """The engine's device (`core.device`, the one place that decides), as a torch device."""
    import torch

    return torch.device(choose_device(backend, device))


def default_memory_budget(device: torch.device) -> int:
    """A safe share of the memory free on the device now, capped (_CPU/_GPU_BUDGET_CAP)."""
    if device.type == "cuda":
        import torch

        free_bytes, _ = torch.cuda.mem_get_info(device)
        return int(min(_BUDGET_FRACTION * free_bytes, _GPU_BUDGET_CAP))
    return cpu_memory_budget()


def cpu_memory_budget() -> int:
    """A safe share of the memory free now, capped at `_CPU_BUDGET_CAP`."""
    return int(min(_BUDGET_FRACTION * available_memory(), _CPU_BUDGET_CAP))


def available_memory() -> int:
    """Bytes of memory available now: Linux's MemAvailable, the figure
    `psutil.virtual_memory().available` reads there, taken from /proc/meminfo without importing
    psutil (≈ 15 ms of a small lookup's start); psutil's where that line is missing."""
    try:
        with open("/proc/meminfo", "rb") as meminfo:
            for line in meminfo:
                if line.startswith(b"MemAvailable:"):
                    kib, unit = line.split()[1:3]
                    if unit == b"kB":
                        return int(kib) * 1024
    except (OSError, ValueError):
        pass
    import psutil

    return psutil.virtual_memory().available


_NO_CANDIDATE = np.iinfo(np.int64).max


def select_answer(
    distances: np.ndarray, indices: np.ndarray, k: int, threshold: float | None, ties: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The answer among refined candidates, ordered by (distance, index), for every engine:
    host arrays (b, K_b); K_b = k, or with `ties` the longest row; short rows end in +inf, -1."""
    admissible = np.isfinite(distances)
    if threshold is not None:
        admissible &= distances.astype(np.float64) <= threshold  # exactly, not against float32(t)
    # Non-negative float32 bit patterns order like the floats, so one int64 key (distance bits
    # high, index low) sorts by (distance, index) in one pass and decodes back into both.
    keys = (np.ascontiguousarray(distances).view(np.int32).astype(np.int64) << 32) | np.maximum(indices, 0)
    keys = np.sort(np.where(admissible, keys, _NO_CANDIDATE), axis=1)
    valid = keys != _NO_CANDIDATE
    sorted_distances = np.where(valid, (keys >> 32).astype(np.int32).view(np.float32), np.inf)
    sorted_indices = np.where(valid, keys & 0xFFFFFFFF, -1)
    if ties and keys.shape[1] >= k:
        keep = valid & (sorted_distances <= sorted_distances[:, k - 1 : k])
    else:
        keep = valid & (np.arange(keys.shape[1]) < k)
    width = max(k, int(keep.sum(1).max())) if len(keys) else k
    sorted_distances = np.where(keep, sorted_distances, np.inf)[:, :width].astype(np.float32)
    sorted_indices = np.where(keep, sorted_indices, -1)[:, :width].astype(np.int64)
    return sorted_distances, sorted_indices


def assemble_rows(
    n_rows: int, k: int, parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """Scatter (rows, distances, indices) parts of varying widths into padded (n_rows, K)."""
    width = max([k] + [part_distances.shape[1] for _, part_distances, _ in parts])
    distances = np.full((n_rows, width), np.inf, dtype=np.float32)
    indices = np.full((n_rows, width), -1, dtype=np.int64)
    for rows, part_distances, part_indices in parts:
        distances[rows, : part_distances.shape[1]] = part_distances
        indices[rows, : part_indices.shape[1]] = part_indices
    return distances, indices
