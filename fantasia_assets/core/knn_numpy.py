"""Exact k-NN search in numpy alone: the engine of small CPU searches, which need not import torch.

Importing torch costs a process about a second of CPU, more than a small lookup's whole search
(1,500 queries × 13,000 references × 256 dims is 10 GFLOP, a tenth of a second of float32 BLAS
on two cores). `engine_for` hands such searches to `NumpySearchEngine` while torch is not loaded
yet; it has `knn.SearchEngine`'s contract (build, then search; cosine or euclidean; neighbours in
ascending (distance, reference index); threshold, exclusions, tie_expansion), the same two stages
and the same answer: it screens in float32 through numpy's BLAS and refines the candidates in
float64. The screen's error bound is its own, derived here for this arithmetic.

Notation: u = 2⁻²⁴, u₆₄ = 2⁻⁵³, n = dim, γ_m(v) = m·v / (1 - m·v); ``fl`` rounds to nearest.

**Cosine.** Build stores r̂_j = fl(r_j · fl(1/‖r_j‖)) in float32 (as `knn` does), the reference's
*stored unit vector*; R = max_j ‖r̂_j‖, measured in float64. The target is T_j = 1 - q̂·r̂_j, q̂ the
exact unit query (refinement computes it). The screen's operand is x = -fl(q · fl(1/‖q‖)), and
its score s̃_j = fl₆₄(1 + ṽ_j), ṽ_j the BLAS float32 dot product x·r̂_j. Then
|s̃_j - T_j| ≤ δ, the sum of:

1. the query's rounding: |x_i + q̂_i| ≤ ((1 + u)³ - 1 + 4u₆₄)|q̂_i| ≤ 3.01u|q̂_i| (the float64
   inverse norm, its rounding to float32, the product's), so |x·r̂_j + q̂·r̂_j| ≤ 3.01u·R;
2. the float32 dot product, in any order, with or without FMA (Higham, *Accuracy and Stability
   of Numerical Algorithms*, §3.1): |ṽ_j - x·r̂_j| ≤ γ_n(u)·Σ|x_i r̂_ji| ≤ γ_n(u)(1 + 3.01u)R;
3. a BLAS that flushes subnormal products and sums errs by < 2⁻¹²⁶ per operation: 2n·2⁻¹²⁶;
4. the float64 sum 1 + ṽ_j: u₆₄(1 + |ṽ_j|) ≤ u₆₄(1 + 2R).

**Euclidean.** The target is T_j = ‖q - r_j‖² of the float32 rows. Build stores w_j =
fl(‖r_j‖²) (the float64 sum of squares rounded to float32); the operand is x = -2q (exact), the
offset o = ‖q‖² in float64, and s̃_j = fl₆₄(o + fl(ṽ_j + w_j)), ṽ_j = BLAS x·r_j. With Z = ‖q‖,
ζ_j = ‖r_j‖ ≤ R = max ζ_j and g = γ_n(u₆₄) (float64 sums of float32 squares: products exact),
|s̃_j - T_j| is at most the sum of: |o - Z²| ≤ gZ²; |w_j - ζ_j²| ≤ (g + u(1 + g))ζ_j²; the dot
product γ_n(u)·2Zζ_j; the float32 addition u(|ṽ_j| + w_j) ≤ u((1 + γ_n(u))2Zζ_j + (1 + u)(1 + g)ζ_j²);
the float64 addition u₆₄(o + |ṽ_j + w_j|(1 + u)); and underflow 2n·2⁻¹²⁶. Each term is largest at
ζ_j = R, which gives one δ per query. (A reference far longer than the others widens every
window: the search stays exact, and screens again more widely, but this engine only takes small
searches; `knn` bounds the euclidean error per reference length.) `knn_inputs` rejects rows of
norm ≥ 2⁵⁶, so no float32 square or product overflows.

Every δ is evaluated in float64 and enlarged by a factor 1 + 2⁻²⁰, which covers that evaluation.

**When the screen holds the answer.** Refinement computes d̂_j (float64) of d_j (cosine d = T,
euclidean d = √T) with error at most ε: absolute (n + 6)·u₆₄·1.01 for cosine (the float64 unit
query, the dot product, the subtraction), relative (n + 3)·u₆₄ for euclidean (the differences,
squares, sum and square root); the answer is defined on D_j = fl₃₂(d̂_j), kept when D_j ≤ D_(k)
(the k-th smallest D; with tie_expansion every D equal to it is kept too) and D_j ≤ t (the
threshold, if any). Screening keeps each query's m smallest s̃. The k of them with smallest s̃ have
T ≤ B = s̃_(k) + δ, so D_(k) ≤ h(B), h(T) = (T + ε)(1 + u) for cosine and √T(1 + ε)(1 + u) for
euclidean (cosine: (max(T + ε, 0))(1 + u), refinement clips to [0, 2]). A kept reference has
D_j ≤ D* = min(h(B), t), hence d_j ≤ D*/(1 - u) + ε (cosine) or D*/((1 - u)(1 - ε)) (euclidean),
hence T_j ≤ U (that d, squared for euclidean) and s̃_j ≤ L = U + δ. (Cosine: a refined distance
clipped to 2 says only T_j ≤ 1 + R, so U is at least that once D* ≥ 2.)
So once the m-th screened score exceeds L (or is +inf: every reference not excluded was screened),
no reference outside the screen can be kept, and only candidates with s̃_j ≤ L are refined. Rows
where it does not hold are screened again with 4m, until m = n_ref. L itself is enlarged by
2⁻⁴⁰|L| + 2⁻¹⁰⁰⁰ for the float64 arithmetic of the check.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from .knn_inputs import (
    assemble_rows,
    checked_references,
    cpu_memory_budget,
    exclusions_for_rows,
    inverse_norms,
    row_sq_norms,
    search_arguments,
    select_answer,
)

METRICS = ("cosine", "euclidean")
UNIT = 2.0**-24
DOUBLE_UNIT = 2.0**-53
_UNDERFLOW = 2.0**-126
_EVALUATION_SLACK = 1 + 2.0**-20
# A search this small (2·n_q·n_ref·dim floating-point operations) costs less in numpy's float32
# BLAS than torch's import (about a second of CPU), even where torch would screen in bf16.
SMALL_SEARCH_FLOPS = 4e10
# This engine holds the references whole in float32; a larger matrix (a memory-mapped million
# references is 4 GiB in float32) goes to `knn`, which streams it, however few the queries.
SMALL_REFERENCE_BYTES = 256 * 2**20
_SCREEN_MARGIN = 8
_MARGIN_GROWTH = 4
_BYTES_PER_PAIR = 16  # float32 block values, argpartition's int64 positions, headroom
_GROUP = 32  # columns per group of the two-stage selection (`smallest_columns`): a power of two


def gamma(terms: int, unit: float) -> float:
    return terms * unit / (1 - terms * unit)


def engine_for(
    metric: str, backend: str, device: str, screening: str, n_queries: int, n_references: int, dim: int
):
    """The engine for a search of this shape: `NumpySearchEngine` for a small CPU search of a
    small matrix (`SMALL_REFERENCE_BYTES` in float32) while torch is not imported yet (results are identical: both equal the exact answer), else
    `knn.SearchEngine` with these settings. A pinned bf16 or int8 screen and the scipy reference
    backend always get `knn`'s engine."""
    small = 2.0 * n_queries * n_references * dim <= SMALL_SEARCH_FLOPS
    small = small and 4 * n_references * dim <= SMALL_REFERENCE_BYTES
    if (
        small
        and device == "cpu"
        and backend in ("torch", "numpy")
        and screening in ("auto", "fp32")
        and "torch" not in sys.modules
    ):
        return NumpySearchEngine(metric)
    from .knn import SearchEngine

    return SearchEngine(metric, backend, device, screening=screening)


class NumpySearchEngine:
    """Exact top-k search of one reference matrix by cosine or euclidean distance, numpy only.

    Args:
        metric: "cosine" or "euclidean".
        memory_budget_bytes: bytes for the screening blocks; None: a share of the free memory.
    """

    backend = "numpy"
    screening = "fp32"

    def __init__(self, metric: str = "cosine", memory_budget_bytes: int | None = None) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        if memory_budget_bytes is not None and memory_budget_bytes < 1:
            raise ValueError(f"memory_budget_bytes must be positive, got {memory_budget_bytes}")
        self.metric = metric
        self._requested_budget = memory_budget_bytes
        self._budget = 0
        self._reference: np.ndarray | None = None  # (n_ref, dim) float32: unit rows for cosine
        self._reference_sq_norms: np.ndarray | None = None  # (n_ref,) float32 w_j, euclidean
        self._reference_norm_max = 0.0  # R of the module docstring

    @property
    def n_references(self) -> int:
        return self._built().shape[0]

    @property
    def dim(self) -> int:
        return self._built().shape[1]

    def _built(self) -> np.ndarray:
        if self._reference is None:
            raise RuntimeError("NumpySearchEngine.build(references) must be called before searching")
        return self._reference

    def build(self, references: np.ndarray, kept: Path | None = None) -> NumpySearchEngine:
        """Prepare `references` (n_ref, dim), float16 or float32; row i is reference index i.
        `kept` is `knn.SearchEngine.build`'s, for the same call: a float32 copy keeps nothing."""
        matrix = checked_references(references)
        prepared = np.array(matrix, dtype=np.float32, order="C", copy=True)
        sq_norms = row_sq_norms(prepared, "references", self.metric)
        if self.metric == "cosine":
            prepared *= inverse_norms(sq_norms).astype(np.float32)[:, None]
            sq_norms = row_sq_norms(prepared, "references", self.metric)
        else:
            self._reference_sq_norms = sq_norms.astype(np.float32)
        self._reference = prepared
        self._reference_norm_max = float(np.sqrt(sq_norms.max()))
        self._budget = self._requested_budget or cpu_memory_budget()
        return self

    def search(
        self,
        queries: np.ndarray,
        k: int,
        threshold: float | None = None,
        exclude: tuple[np.ndarray, np.ndarray] | None = None,
        tie_expansion: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest references of each query row: `knn.SearchEngine.search`'s contract.

        Returns (distances float32 (n_q, K), indices int64 (n_q, K)), ascending by (distance,
        index); K = k, or with tie_expansion the longest row; short rows end in +inf and -1.
        """
        n_references, dim = self._built().shape
        n_queries, k, indptr, excluded, q32, q_sq_norms = search_arguments(
            queries, k, threshold, exclude, n_references, dim, self.metric
        )
        rows = np.repeat(np.arange(n_queries), np.diff(indptr))
        return self._search_rows(q32, q_sq_norms, (rows, excluded), k, threshold, tie_expansion)

    def _query_forms(self, q32: np.ndarray, q_sq_norms: np.ndarray):
        """(screening operands x (b, dim) float32, offsets o (b,), refinement form (b, dim)
        float64, bounds δ (b,)) of the module docstring."""
        n, big_r = self.dim, self._reference_norm_max
        dot_error = gamma(n, UNIT)
        underflow = 2 * n * _UNDERFLOW
        if self.metric == "cosine":
            inverse = inverse_norms(q_sq_norms)
            operands = -(q32 * inverse.astype(np.float32)[:, None])
            exact = q32.astype(np.float64) * inverse[:, None]
            offsets = np.ones(len(q32))
            delta = 3.01 * UNIT * big_r + dot_error * (1 + 3.01 * UNIT) * big_r + underflow
            delta += DOUBLE_UNIT * (1 + 2 * big_r)
            return operands, offsets, exact, np.full(len(q32), delta * _EVALUATION_SLACK)
        g = gamma(n, DOUBLE_UNIT)
        z = np.sqrt(q_sq_norms)
        w_error = (g + UNIT * (1 + g)) * big_r**2
        w_max = (1 + UNIT) * (1 + g) * big_r**2
        product = (1 + dot_error) * 2 * z * big_r  # ≥ |ṽ_j|
        delta = g * q_sq_norms + w_error + dot_error * 2 * z * big_r + UNIT * (product + w_max)
        delta += DOUBLE_UNIT * (q_sq_norms * (1 + g) + (product + w_max) * (1 + UNIT)) + underflow
        return -2 * q32, q_sq_norms, q32.astype(np.float64), delta * _EVALUATION_SLACK

    def _block_rows(self, n_rows: int) -> int:
        return max(1, min(n_rows, self._budget // (self.n_references * _BYTES_PER_PAIR)))

    def _search_rows(self, q32, q_sq_norms, exclusions, k, threshold, tie_expansion):
        n_rows, n_references = len(q32), self.n_references
        parts = []
        block = self._block_rows(n_rows)
        for start in range(0, n_rows, block):
            rows = np.arange(start, min(start + block, n_rows))
            operands, offsets, exact, deltas = self._query_forms(q32[rows], q_sq_norms[rows])
            block_exclusions = exclusions_for_rows(exclusions, rows, n_rows)
            pending, width = np.arange(len(rows)), min(k + _SCREEN_MARGIN, n_references)
            while pending.size:
                values, indices = self._screen(
                    operands[pending], exclusions_for_rows(block_exclusions, pending, len(rows)), width
                )
                scores = values + offsets[pending, None]
                enough, limit = self._screened_enough(scores, k, deltas[pending], threshold)
                if width == n_references:
                    enough[:] = True
                    limit[:] = math.inf
                done = np.flatnonzero(enough)
                admissible = np.isfinite(scores[done]) & (scores[done] <= limit[done, None])
                admissible &= indices[done] >= 0
                distances = self._refine(exact[pending[done]], indices[done], admissible)
                selected = select_answer(distances, indices[done], k, threshold, tie_expansion)
                parts.append((rows[pending[done]], *selected))
                pending = np.delete(pending, done)
                width = min(width * _MARGIN_GROWTH, n_references)
        return assemble_rows(n_rows, k, parts)

    def _screen(self, operands: np.ndarray, exclusions, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(values float64 (b, width), reference indices int64 (b, width)) of the `width` smallest
        block values x·y_j (+ w_j) per row, unordered; excluded references are +inf."""
        values = operands @ self._reference.T
        if self.metric == "euclidean":
            values += self._reference_sq_norms
        rows, cols = exclusions
        if len(cols):
            values[rows, cols] = np.inf
        if width >= values.shape[1]:
            positions = np.broadcast_to(np.arange(values.shape[1]), values.shape)
        else:
            positions = smallest_columns(values, width)
        chosen = np.take_along_axis(values, positions, axis=1).astype(np.float64)
        return chosen, np.ascontiguousarray(positions, dtype=np.int64)

    def _screened_enough(self, scores: np.ndarray, k: int, deltas: np.ndarray, threshold: float | None):
        """(rows whose screen provably holds their answer (b,), L (b,)): module docstring."""
        ordered = np.sort(scores, axis=1)
        kth = ordered[:, min(k, ordered.shape[1]) - 1]
        reach = kth + deltas
        with np.errstate(invalid="ignore"):
            if self.metric == "cosine":
                error = (self.dim + 6) * DOUBLE_UNIT * 1.01
                bound = np.maximum(reach + error, 0) * (1 + UNIT)
            else:
                error = (self.dim + 3) * DOUBLE_UNIT
                bound = np.sqrt(np.maximum(reach, 0)) * (1 + error) * (1 + UNIT)
            if threshold is not None:
                bound = np.minimum(bound, threshold)
            if self.metric == "cosine":
                reachable = bound / (1 - UNIT) + error
                # a refined distance clipped to 2 hides targets up to 1 + R (module docstring)
                reachable = np.where(
                    bound >= 2, np.maximum(reachable, 1 + self._reference_norm_max), reachable
                )
            else:
                reachable = np.square(bound / ((1 - UNIT) * (1 - error)))
            limit = reachable + deltas
            limit = limit + 2.0**-40 * np.abs(limit) + 2.0**-1000
        last = ordered[:, -1]
        return np.isinf(last) | (last > limit), limit

    def _refine(self, exact_queries: np.ndarray, indices: np.ndarray, admissible: np.ndarray) -> np.ndarray:
        """Float64 distances of the admissible candidates, rounded to float32 (+inf elsewhere)."""
        distances = np.full(indices.shape, np.inf, dtype=np.float32)
        rows, columns = np.nonzero(admissible)
        if not len(rows):
            return distances
        candidates = self._reference[indices[rows, columns]].astype(np.float64)
        if self.metric == "cosine":
            dots = np.einsum("ij,ij->i", candidates, exact_queries[rows])
            values = np.clip(1.0 - dots, 0.0, 2.0)
        else:
            candidates -= exact_queries[rows]
            values = np.sqrt(np.einsum("ij,ij->i", candidates, candidates))
        distances[rows, columns] = values.astype(np.float32)
        return distances


def smallest_columns(values: np.ndarray, count: int) -> np.ndarray:
    """Column positions (b, count) of `count` smallest values of each row, unordered.

    Two stages, as `screen.smallest_columns` (where the exactness argument is), because a
    partition over a wide row costs several times a pass of minima: column c belongs to group
    c mod (width // G), G = 32; the `count` groups of smallest minimum hold `count` values no
    larger than any value of the other groups, so the answer is among their members (and the
    last width % G columns, in no group). The minima of the groups are one reduction over a view
    of the rows (`min` over the middle axis: one pass, ≈ 20% less than halving the rows in
    log2(G) passes); the members' values are gathered by flat position.
    """
    rows, width = values.shape
    groups = width // _GROUP
    if groups < 4 * count:  # too few groups to prune anything
        return np.argpartition(values, count - 1, axis=1)[:, :count]
    body = groups * _GROUP
    # one pass over a view, row r's (G, groups) block: column c = i·groups + j is in group j
    minima = values[:, :body].reshape(rows, _GROUP, groups).min(axis=1)
    chosen = np.argpartition(minima, count - 1, axis=1)[:, :count]
    columns = (chosen[:, :, None] + np.arange(0, body, groups)).reshape(rows, count * _GROUP)
    if body < width:
        columns = np.hstack((columns, np.broadcast_to(np.arange(body, width), (rows, width - body))))
    # their values by flat positions: half the time of `take_along_axis`'s broadcast indices
    members = values.reshape(-1)[columns + np.arange(0, rows * width, width)[:, None]]
    picked = np.argpartition(members, count - 1, axis=1)[:, :count]
    return np.take_along_axis(columns, picked, axis=1)
