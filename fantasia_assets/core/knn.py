"""Exact k-nearest-neighbour search of query embeddings in a reference matrix (SPEC §3.3-3.4).

The engine has FAISS's shape: build it once from the reference matrix, then search it as often
as needed::

    engine = SearchEngine(metric="cosine", backend="torch").build(reference_matrix)
    distances, indices = engine.search(query_matrix, k=5)

Distances: cosine ``d = 1 - q̂·r̂`` clamped to [0, 2]; a zero-norm vector has no direction, so its
normalised form is taken as the zero vector and its distance to everything is exactly 1.
Euclidean ``d = ‖q - r‖₂``. Neighbours come in ascending (distance, reference index) order, so
ties resolve to the smaller index, identically on every backend.

A search has two stages.

**Screening** keeps, per query, the m ≥ k references of smallest *fast score*, a float32 matrix
product: ``1 - q̂·r̂`` (cosine) or ``‖q‖² + ‖r‖² - 2q·r`` (the squared distance, monotone in d).
Queries and references are cut into blocks sized from a memory budget; each block's product is
reduced at once by a top-m (``torch.topk``, ``np.argpartition``, or cdist + argsort on the scipy
reference backend) merged into a running top-m, so the n_q × n_ref matrix never exists. The
prepared reference matrix is placed on the device once, at build.

**Refinement** recomputes the candidates' distances directly in float64 (normalised dot product;
norm of the difference, free of the euclidean expansion's cancellation), rounds them to float32
and sorts by (distance, index). Screening only has to *contain* the answer, so every backend
returns the same neighbours with the same distances.

Why screening contains the answer. Write s for the exact score (d for cosine, d² for euclidean),
s̃ for the fast one and δ ≥ |s̃ - s| for the query's worst case (`_screening_error_bound`). Let
s_k and s̃_k be the k-th smallest exact and fast scores. At least k references have s̃ ≤ s̃_k,
hence s ≤ s̃_k + δ, so s_k ≤ s̃_k + δ. A reference in the answer (or tied with its k-th) has
s ≤ s_k, so s̃ ≤ s + δ ≤ s̃_k + 2δ; with a threshold (t_s in score units) also s̃ ≤ t_s + δ.
Once the m-th screened fast score is strictly above min(s̃_k, t_s) + 2δ, no reference left out
can belong to the answer. Rows where it is not (near-ties, duplicated references, zero-norm
cosine queries) are screened again with a larger m until it is, or until m = n_ref.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import numpy as np
import psutil
import torch
from scipy.spatial.distance import cdist

from .device import resolve_device

METRICS = ("cosine", "euclidean")
BACKENDS = ("torch", "numpy", "scipy")

_UNIT_ROUNDOFF = 2.0**-24  # float32
_SCREEN_MARGIN = 8  # candidates screened beyond k at first: enough for all but near-tied rows
_MARGIN_GROWTH = 4
_REFINE_CHUNK_BYTES = 1 << 20  # float64 candidate rows refined per chunk (cache-sized)
_MIN_QUERY_BLOCK = 256  # rows per product below which GEMMs lose efficiency
# Working bytes per (query, reference) pair of a screening block: the product plus selection
# workspace (argpartition's int64 positions; cdist's float64 values and argsort's int64 order).
_BYTES_PER_PAIR = {"torch": 8, "numpy": 16, "scipy": 24}
_BUDGET_FRACTION = 0.25
# Beyond a few hundred MiB per block the per-block overhead is already under 1% of the product's
# time, so larger blocks would only take memory from the rest of the pipeline.
_CPU_BUDGET_CAP = 512 * 2**20
_GPU_BUDGET_CAP = 4 * 2**30
_NORM_ROWS_PER_CHUNK = 4096
_NO_CANDIDATE = torch.iinfo(torch.int64).max

_Exclusions = tuple[np.ndarray, np.ndarray]  # (query row, reference index) pairs, int64


class SearchEngine:
    """Exact top-k search of one reference matrix by cosine or euclidean distance.

    Args:
        metric: "cosine" or "euclidean".
        backend: "torch" (CUDA or CPU), "numpy" (BLAS + argpartition) or "scipy" (cdist +
            argsort: the original CPU path, kept as a reference implementation).
        device: "cuda", "cpu" or None: CUDA when the backend is torch and CUDA is available.
        memory_budget_bytes: bytes the engine may use for distance blocks and refinement; None
            derives it from the memory available on the device at build.
    """

    def __init__(
        self,
        metric: str = "cosine",
        backend: str = "torch",
        device: str | None = None,
        memory_budget_bytes: int | None = None,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if memory_budget_bytes is not None and memory_budget_bytes < 1:
            raise ValueError(f"memory_budget_bytes must be positive, got {memory_budget_bytes}")
        self.metric = metric
        self.backend = backend
        self.device = _resolve_device(backend, device)
        self._requested_budget = memory_budget_bytes
        self._budget = 0
        self._reference: torch.Tensor | None = None  # (n_ref, dim) float32 on the device
        self._reference_sq_norms: torch.Tensor | None = None  # (n_ref,) float32, euclidean only
        self._max_reference_sq_norm = 1.0

    @property
    def n_references(self) -> int:
        """Number of reference rows searched."""
        return self._built_reference().shape[0]

    @property
    def dim(self) -> int:
        """Embedding dimension the queries must have."""
        return self._built_reference().shape[1]

    def build(self, references: np.ndarray) -> SearchEngine:
        """Prepare `references` (n_ref, dim), float16 or float32; row i is reference index i.

        Rows are widened to float32 once (normalised for cosine; squared norms kept for
        euclidean) and placed on the device for the engine's lifetime. A C-contiguous float32
        matrix searched by euclidean distance on the CPU is used in place, not copied: leave it
        unchanged while the engine is in use.
        """
        matrix = np.asarray(references)
        if matrix.ndim != 2 or matrix.shape[1] == 0:
            raise ValueError(f"references must be a 2-D (n_ref, dim) matrix, got {matrix.shape}")
        if matrix.shape[0] == 0:
            raise ValueError("the reference set is empty: there is nothing to search")
        if not np.issubdtype(matrix.dtype, np.floating):
            raise ValueError(f"references must be float16 or float32, got {matrix.dtype}")
        self._reference = self._reference_sq_norms = None  # free device memory before reuse
        # Cosine normalises in place, so it needs its own copy.
        copy = True if self.metric == "cosine" else None
        if matrix.dtype == np.float16:
            # torch widens half precision with F16C instructions, ~10× faster than numpy here
            prepared = torch.from_numpy(np.ascontiguousarray(matrix)).to(torch.float32).numpy()
        else:
            prepared = np.array(matrix, dtype=np.float32, order="C", copy=copy)
        sq_norms = _row_sq_norms(prepared, "references")
        if self.metric == "cosine":
            prepared *= _inverse_norms(sq_norms).astype(np.float32)[:, None]
            self._max_reference_sq_norm = 1.0
        else:
            self._reference_sq_norms = torch.from_numpy(sq_norms.astype(np.float32)).to(self.device)
            self._max_reference_sq_norm = float(sq_norms.max())
        self._reference = torch.from_numpy(prepared).to(self.device)  # no copy on the CPU
        self._budget = self._requested_budget or _default_memory_budget(self.device)
        return self

    def search(
        self,
        queries: np.ndarray,
        k: int,
        threshold: float | None = None,
        exclude: tuple[np.ndarray, np.ndarray] | None = None,
        tie_expansion: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest references of each query row.

        Args:
            queries: (n_q, dim) float32 or float64 (rounded to float32, in which SPEC computes).
            k: neighbours per query, ≥ 1.
            threshold: keep only distances ≤ threshold; None keeps all.
            exclude: CSR (indptr int (n_q + 1,), ref_indices int): the references
                ``ref_indices[indptr[i]:indptr[i + 1]]`` are removed for query i before the top-k.
            tie_expansion: also keep every reference whose distance equals the k-th (goPredSim).

        Returns:
            (distances float32 (n_q, K), indices int64 (n_q, K)), ascending by (distance, index).
            K = k, or with tie_expansion the longest row (at least k). Rows with fewer
            neighbours end in distance +inf and index -1.
        """
        n_references, dim = self._built_reference().shape
        query_matrix = np.asarray(queries)
        if query_matrix.ndim != 2 or query_matrix.shape[1] != dim:
            raise ValueError(f"queries must be (n_q, {dim}) to match, got {query_matrix.shape}")
        if not np.issubdtype(query_matrix.dtype, np.floating):
            raise ValueError(f"queries must be floating point, got {query_matrix.dtype}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k must be an integer ≥ 1, got {k!r}")
        if threshold is not None and not threshold >= 0:
            raise ValueError(f"threshold must be None or a distance ≥ 0, got {threshold!r}")
        n_queries, k = len(query_matrix), int(k)
        indptr, excluded = _validate_exclusions(exclude, n_queries, n_references)
        q32 = np.ascontiguousarray(query_matrix, dtype=np.float32)
        q_sq_norms = _row_sq_norms(q32, "queries")
        query_block = self._block_shape(n_queries)[0]
        parts = []
        with _ieee_float32_matmul():
            for start in range(0, n_queries, query_block):
                block = slice(start, min(start + query_block, n_queries))
                pointers = indptr[block.start : block.stop + 1]
                rows = np.repeat(np.arange(len(pointers) - 1), np.diff(pointers))
                exclusions = (rows, excluded[pointers[0] : pointers[-1]])
                found = self._search_query_block(
                    q32[block], q_sq_norms[block], exclusions, k, threshold, tie_expansion
                )
                parts.append((np.arange(block.start, block.stop), *found))
        return _assemble(n_queries, k, parts)

    def _built_reference(self) -> torch.Tensor:
        if self._reference is None:
            raise RuntimeError("SearchEngine.build(references) must be called before searching")
        return self._reference

    def _block_shape(self, n_queries: int) -> tuple[int, int]:
        """(query rows, reference rows) of a screening block that fits the memory budget."""
        n_references, dim = self._built_reference().shape
        per_pair = _BYTES_PER_PAIR[self.backend]
        per_reference = 8 * dim if self.backend == "scipy" else 0  # cdist's float64 copy
        query_block = max(1, min(n_queries, _MIN_QUERY_BLOCK))
        reference_block = self._budget // (query_block * per_pair + per_reference)
        reference_block = min(n_references, max(1, reference_block))
        spare = self._budget - reference_block * per_reference
        query_block = min(max(n_queries, 1), max(1, spare // (reference_block * per_pair)))
        return query_block, reference_block

    def _search_query_block(
        self,
        q32: np.ndarray,
        q_sq_norms: np.ndarray,
        exclusions: _Exclusions,
        k: int,
        threshold: float | None,
        tie_expansion: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Screen, check sufficiency (module docstring), refine and select for a query block."""
        n_rows, n_references = len(q32), self.n_references
        fast_queries, offsets, exact_queries = self._prepare_queries(q32, q_sq_norms)
        bounds = _screening_error_bound(self.metric, self.dim, q_sq_norms, self._max_reference_sq_norm)
        bounds = torch.from_numpy(bounds).to(self.device)
        offsets = torch.from_numpy(offsets).to(self.device)
        threshold_score = threshold  # in score units: d for cosine, d² for euclidean
        if threshold is not None and self.metric == "euclidean":
            threshold_score = threshold**2
        pending, width, parts = np.arange(n_rows), min(k + _SCREEN_MARGIN, n_references), []
        while pending.size:
            pending_exclusions = _exclusions_for_rows(exclusions, pending, n_rows)
            values, indices = self._screen(fast_queries[pending], pending_exclusions, width)
            pending_device = torch.from_numpy(pending).to(self.device)
            scores = values + offsets[pending_device, None]
            if width == n_references:
                enough = torch.ones(len(pending), dtype=torch.bool, device=self.device)
            else:
                enough = _screened_enough(scores, k, bounds[pending_device], threshold_score)
            rows = enough.nonzero().squeeze(1)
            admissible = torch.isfinite(scores[rows]) & (indices[rows] >= 0)
            distances = self._refine(exact_queries[pending_device[rows]], indices[rows], admissible)
            done = rows.cpu().numpy()
            selected = _select(distances, indices[rows], k, threshold, tie_expansion)
            parts.append((pending[done], *selected))
            pending = np.delete(pending, done)
            width = min(width * _MARGIN_GROWTH, n_references)
        return _assemble(n_rows, k, parts)

    def _prepare_queries(
        self, q32: np.ndarray, q_sq_norms: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """(screening form (b, dim) float32, score offsets (b,), refinement form (b, dim) float64).

        torch and numpy screen on block values ``-q̂·r̂`` (cosine, offset 1) or ``‖r‖² - 2q·r``
        (euclidean, offset ‖q‖²): negating and doubling are exact and fold the score's arithmetic
        into the matrix product. cdist returns the score itself (offset 0).
        """
        exact = torch.from_numpy(q32).to(self.device, torch.float64)
        if self.metric == "cosine":
            inverse_norms = _inverse_norms(q_sq_norms)
            exact *= torch.from_numpy(inverse_norms).to(self.device)[:, None]
            unit = q32 * inverse_norms.astype(np.float32)[:, None]
            if self.backend == "scipy":
                return unit, np.zeros(len(q32)), exact
            return -unit, np.ones(len(q32)), exact
        if self.backend == "scipy":
            return q32, np.zeros(len(q32)), exact
        return -2 * q32, q_sq_norms, exact

    def _screen(
        self, fast_queries: np.ndarray, exclusions: _Exclusions, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The `width` smallest block values per query, over reference blocks sized for b queries.

        Returns (values float64 (b, width), indices int64 (b, width)) on the device, unordered;
        excluded references and padding have value +inf (padding has index -1).
        """
        shape, reference_block = (len(fast_queries), width), self._block_shape(len(fast_queries))[1]
        if self.backend == "torch":
            xp, queries = torch, torch.from_numpy(fast_queries).to(self.device)
            rows, cols = (torch.from_numpy(pairs).to(self.device) for pairs in exclusions)
            best_values = torch.full(shape, math.inf, device=self.device)
            best_indices = torch.full(shape, -1, dtype=torch.int64, device=self.device)
        else:
            xp, queries, (rows, cols) = np, fast_queries, exclusions
            best_values, best_indices = np.full(shape, np.inf), np.full(shape, -1, dtype=np.int64)
        # one output buffer for every block: a fresh multi-hundred-MiB allocation per block
        # costs page faults comparable to a tenth of the block's matmul
        buffer = (
            torch.empty(len(fast_queries) * reference_block, device=self.device)
            if self.backend == "torch"
            else None
        )
        for start in range(0, self.n_references, reference_block):
            stop = min(start + reference_block, self.n_references)
            values = self._block_values(queries, start, stop, buffer)
            if len(cols):
                in_block = (cols >= start) & (cols < stop)
                values[rows[in_block], cols[in_block] - start] = math.inf
            if self.backend == "scipy":
                positions = np.argsort(values, axis=1)[:, :width]
            else:
                positions = _smallest_positions(values, min(width, stop - start))
            merged_values = xp.concatenate((best_values, _take(values, positions)), axis=1)
            merged_indices = xp.concatenate((best_indices, positions + start), axis=1)
            keep = _smallest_positions(merged_values, width)
            best_values, best_indices = _take(merged_values, keep), _take(merged_indices, keep)
        if self.backend == "torch":
            return best_values.double(), best_indices
        return tuple(torch.from_numpy(best).to(self.device) for best in (best_values, best_indices))

    def _block_values(
        self, queries: np.ndarray | torch.Tensor, start: int, stop: int, buffer: torch.Tensor | None = None
    ) -> np.ndarray | torch.Tensor:
        """Screening values of all queries against references [start, stop): (b, stop - start).

        torch writes into `buffer` (a flat tensor of at least b × (stop - start) elements) when given.
        """
        block = self._reference[start:stop]
        if self.backend == "torch":
            out = (
                None
                if buffer is None
                else buffer[: len(queries) * (stop - start)].view(len(queries), stop - start)
            )
            if self.metric == "euclidean":
                return torch.addmm(self._reference_sq_norms[start:stop], queries, block.T, out=out)
            return torch.mm(queries, block.T, out=out)
        block = block.numpy()  # the CPU backends share the tensor's memory
        if self.backend == "numpy":
            values = queries @ block.T
            if self.metric == "euclidean":
                values += self._reference_sq_norms[start:stop].numpy()
            return values
        values = cdist(queries, block, "cosine" if self.metric == "cosine" else "sqeuclidean")
        if self.metric == "cosine":
            values[np.isnan(values)] = 1.0  # cdist's 0/0 for zero-norm rows: see module docstring
        return values

    def _refine(
        self, exact_queries: torch.Tensor, indices: torch.Tensor, admissible: torch.Tensor
    ) -> torch.Tensor:
        """Exact distances, float32 (b, m) (+inf where not admissible), of screened candidates.

        Computed in float64 over (query, candidate) pairs, in chunks bounded by the budget.
        """
        distances = torch.full(indices.shape, math.inf, dtype=torch.float64, device=self.device)
        rows, cols = admissible.nonzero(as_tuple=True)
        # chunks small enough for the float64 temporaries to stay in cache: this step moves
        # memory, it has few FLOPs
        pairs_per_chunk = max(
            1, min(self._budget // (4 * 8 * self.dim), _REFINE_CHUNK_BYTES // (8 * self.dim))
        )
        for start in range(0, len(rows), pairs_per_chunk):
            row, col = rows[start : start + pairs_per_chunk], cols[start : start + pairs_per_chunk]
            query, candidate = exact_queries[row], self._reference[indices[row, col]].double()
            if self.metric == "cosine":
                distances[row, col] = (1.0 - (query * candidate).sum(1)).clamp_(0.0, 2.0)
            else:
                distances[row, col] = (query - candidate).square_().sum(1).sqrt_()
        return distances.float()


def _select(
    distances: torch.Tensor, indices: torch.Tensor, k: int, threshold: float | None, ties: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Order refined candidates by (distance, index) and keep the answer: host arrays (b, K_b)."""
    admissible = torch.isfinite(distances)
    if threshold is not None:
        admissible &= distances.double() <= threshold  # exactly, not against float32(threshold)
    # Non-negative float32 bit patterns order like the floats, so one int64 key (distance bits
    # high, index low) sorts by (distance, index) in one pass and decodes back into both.
    keys = (distances.view(torch.int32).long() << 32) | indices
    keys = torch.where(admissible, keys, _NO_CANDIDATE).sort(dim=1).values
    valid = keys != _NO_CANDIDATE
    sorted_distances = torch.where(valid, (keys >> 32).int().view(torch.float32), math.inf)
    sorted_indices = torch.where(valid, keys & 0xFFFFFFFF, -1)
    if ties and keys.shape[1] >= k:
        keep = valid & (sorted_distances <= sorted_distances[:, k - 1 : k])
    else:
        keep = valid & (torch.arange(keys.shape[1], device=keys.device) < k)
    width = max(k, int(keep.sum(1).max())) if len(keys) else k
    sorted_distances = torch.where(keep, sorted_distances, math.inf)[:, :width]
    sorted_indices = torch.where(keep, sorted_indices, -1)[:, :width]
    return sorted_distances.cpu().numpy(), sorted_indices.cpu().numpy()


def _screened_enough(
    scores: torch.Tensor, k: int, bounds: torch.Tensor, threshold_score: float | None
) -> torch.Tensor:
    """Whether each row's screening provably holds its answer (bool (b,)): module docstring."""
    ordered = scores.sort(dim=1).values
    limit = ordered[:, min(k, ordered.shape[1]) - 1] + 2 * bounds
    if threshold_score is not None:
        limit = torch.minimum(limit, threshold_score + 2 * bounds)
    last = ordered[:, -1]
    return torch.isinf(last) | (last > limit)


def _screening_error_bound(
    metric: str, dim: int, query_sq_norms: np.ndarray, max_reference_sq_norm: float
) -> np.ndarray:
    """δ per query (b,): the largest |fast score - exact score| over the references, score units.

    A float32 dot product of n terms errs by at most γ_n Σ|q_i r_i| ≤ γ_n ‖q‖‖r‖ (Higham,
    Accuracy and Stability of Numerical Algorithms, §3.1), in any summation order, with or
    without FMA, so for any IEEE float32 BLAS or cuBLAS kernel; γ_n = n·u / (1 - n·u), u = 2⁻²⁴.
    Cosine: ‖q̂‖, ‖r̂‖ ≤ 1 + 2u after float32 normalisation and ``1 - x`` adds at most 2u.
    Euclidean: the product is doubled (exactly) and summed with ‖r‖² and ‖q‖²; every partial sum
    is at most 2(‖q‖² + ‖r‖²) and 2‖q‖‖r‖ ≤ ‖q‖² + ‖r‖², so the error stays below
    2γ_{n+4}(‖q‖² + ‖r‖²). Sixteen extra terms of slack also cover the float32 rounding of the
    stored norms and of the refined distance (so references tying the k-th in float32 are
    screened too) and the float64 refinement's own error.
    """
    n = dim + 16
    gamma = n * _UNIT_ROUNDOFF / (1 - n * _UNIT_ROUNDOFF)
    if metric == "cosine":
        return np.full(len(query_sq_norms), gamma)
    return 2 * gamma * (query_sq_norms + max_reference_sq_norm)


def _smallest_positions(values: np.ndarray | torch.Tensor, count: int) -> np.ndarray | torch.Tensor:
    """Column positions of the `count` smallest values of each row, unordered."""
    if isinstance(values, torch.Tensor):
        return torch.topk(values, count, dim=1, largest=False, sorted=False).indices
    if count >= values.shape[1]:
        return np.broadcast_to(np.arange(values.shape[1]), values.shape)
    return np.argpartition(values, count - 1, axis=1)[:, :count]


def _take(values: np.ndarray | torch.Tensor, positions: np.ndarray | torch.Tensor):
    if isinstance(values, torch.Tensor):
        return values.gather(1, positions)
    return np.take_along_axis(values, positions, axis=1)


def _assemble(
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


def _exclusions_for_rows(exclusions: _Exclusions, rows: np.ndarray, n_rows: int) -> _Exclusions:
    """The exclusion pairs of `rows`, renumbered to positions in `rows`."""
    excluded_rows, excluded_references = exclusions
    position = np.full(n_rows, -1, dtype=np.int64)
    position[rows] = np.arange(len(rows))
    new_rows = position[excluded_rows]
    kept = new_rows >= 0
    return new_rows[kept], excluded_references[kept]


def _validate_exclusions(
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


def _row_sq_norms(matrix: np.ndarray, name: str) -> np.ndarray:
    """Squared L2 norm of each float32 row, accumulated in float64: (n,), chunked copies."""
    sq_norms = np.empty(len(matrix))
    for start in range(0, len(matrix), _NORM_ROWS_PER_CHUNK):
        chunk = matrix[start : start + _NORM_ROWS_PER_CHUNK].astype(np.float64)
        sq_norms[start : start + len(chunk)] = np.einsum("ij,ij->i", chunk, chunk)
    if not np.isfinite(sq_norms).all():  # any NaN or inf in a row makes its norm non-finite
        row = int(np.argmin(np.isfinite(sq_norms)))
        raise ValueError(f"{name} contain NaN or infinite values (row {row})")
    return sq_norms


def _inverse_norms(sq_norms: np.ndarray) -> np.ndarray:
    """1/‖x‖ per row (float64); 0 for zero-norm rows, whose normalised form is the zero vector."""
    inverse = np.zeros_like(sq_norms)
    np.divide(1.0, np.sqrt(sq_norms), out=inverse, where=sq_norms > 0)
    return inverse


def _resolve_device(backend: str, device: str | None) -> torch.device:
    return torch.device(resolve_device(backend, device))


def _default_memory_budget(device: torch.device) -> int:
    """A safe share of the memory free on the device now, capped (_CPU/_GPU_BUDGET_CAP)."""
    if device.type == "cuda":
        free_bytes, _ = torch.cuda.mem_get_info(device)
        return int(min(_BUDGET_FRACTION * free_bytes, _GPU_BUDGET_CAP))
    return int(min(_BUDGET_FRACTION * psutil.virtual_memory().available, _CPU_BUDGET_CAP))


@contextlib.contextmanager
def _ieee_float32_matmul() -> Iterator[None]:
    """Keep float32 products in IEEE float32 (no TF32 or bf16 passes) so that CUDA matches the
    CPU and the error bound holds; the setting is process-wide, so the caller's is restored."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)
