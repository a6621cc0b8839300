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

**Screening** keeps, per query, the m ≥ k references of smallest *fast score*, a matrix product:
``1 - q̂·r̂`` (cosine) or ``‖q‖² + ‖r‖² - 2q·r`` (the squared distance, monotone in d). It runs
in float32, or in bfloat16/float16 on matrix units (AMX, AVX512-BF16, tensor cores) where those
are several times faster: `screen` chooses (``screening="auto" | "bf16" | "fp32"``); or in 8-bit
integers (``"int8"``, cosine on the CPU), which ``"auto"`` takes where an estimate from a sample
of the references says it is faster (`knn_choice`).
Queries and references are cut into blocks sized from a memory budget; each block's product is
reduced at once by an exact top-m (`screen.smallest_columns`, ``np.argpartition``, or cdist +
argsort on the scipy reference backend) merged into a running top-m, so the n_q × n_ref matrix
never exists. torch's cosine screen on the CPU selects by admission thresholds instead
(`knn_admission`): per query a limit that only the answer's references can reach, set from the
first block and tightened block by block, so that a block costs one pass of integer maxima over
its product instead of a top-m; the few rows it cannot bound go to the top-m screen. The screen's operands are prepared once, at build, and kept on the device
(`knn_reference`: a memory-mapped float16 matrix is read block by block and never held in float32).

**Refinement** recomputes the distances of the few admissible candidates, gathered from the
reference rows as given, directly in float64 (normalised dot product;
norm of the difference, free of the euclidean expansion's cancellation), rounds them to float32
and sorts by (distance, index). It runs in two steps: the k candidates of smallest screened
score first, whose largest distance narrows the window of the others (`knn_bounds.refined_limit`).
Screening only has to *contain* the answer, so every backend and every screening precision
returns the same neighbours with the same distances. torch's cosine screen on the CPU splits a
search's queries among worker threads, torch on one thread each (`knn_admission.run_blocks`), so
that the selection and refinement, which run on one thread, leave no core idle.

Why screening contains the answer. Write s for the exact score (d for cosine, d² for euclidean),
s̃ for the fast one and δ ≥ |s̃ - s| for the query's worst case over the references: `knn_bounds`
derives δ for every arithmetic, covering the rounding of queries and references to the screen's
type, the kernel's accumulation, the rounding of its output and of the stored norms (for
euclidean δ grows with the score, so that one long outlying reference does not widen every
query's window; the argument below carries over with that δ; for cosine with a 16-bit output
the output's rounding is bounded per score instead, h(p̃) of each, which the argument carries
the same way with s̃ ± h(p̃) in place of s̃: `knn_bounds`, item 4). Let s_k and
s̃_k be the k-th smallest exact and fast scores. At least k references have s̃ ≤ s̃_k, hence
s ≤ s̃_k + δ, so s_k ≤ s̃_k + δ. A reference in the answer (or tied with its k-th) has s ≤ s_k,
so s̃ ≤ s + δ ≤ s̃_k + 2δ; with a threshold (t_s in score units) also s̃ ≤ t_s + δ. Once the m-th
screened fast score is strictly above min(s̃_k, t_s) + 2δ (widened by the float32 rounding of the
refined distances: `knn_bounds.screened_enough`), no reference left out can belong to the
answer. Rows where it is not (near-ties, duplicated references, zero-norm cosine queries) are
screened again with a larger m until it is, or until m = n_ref.
"""

from __future__ import annotations

import contextlib
import copy
import math
import threading
from pathlib import Path

import numpy as np
import torch
from scipy.spatial.distance import cdist

from . import knn_admission, knn_choice, screen, units
from .knn_bounds import refined_limit, screened_enough, screening_error_bound
from .knn_inputs import (
    Exclusions,
    assemble_rows,
    checked_references,
    default_memory_budget,
    exclusions_for_rows,
    inverse_norms,
    resolve_device,
    search_arguments,
    select_answer,
)
from .knn_reference import PreparedReferences
from .timing import part

METRICS = ("cosine", "euclidean")
BACKENDS = ("torch", "numpy", "scipy")
SCREENINGS = screen.SCREENINGS

# Candidates screened beyond k at first: enough for all but near-tied rows in float32; a 16-bit
# screen's window is ~2⁸ times wider (real 256-d data: 13 candidates on average for k = 5, 36 at
# the 99th percentile), and a row screened again costs its whole product again.
_SCREEN_MARGIN = {"fp32": 8, "half": 32}
_MARGIN_GROWTH = 4
# (query, candidate) pairs refined per chunk: their float64 rows (2 MiB at 1,024 dims) stay in cache
_REFINE_PAIRS = 256
# a GPU's refinement step: float64 candidate and query rows of at most this many bytes each
_DEVICE_REFINE_BYTES = 2**28
_MIN_QUERY_BLOCK = 256  # rows per product below which GEMMs lose efficiency
# A screened candidate's cost in seconds (bookkeeping and refinement): a constant and a part per
# dimension (`SearchEngine._dense_limit`; 0.66 µs measured at 256 dimensions on the CPU)
_CANDIDATE_SECONDS = (0.4e-6, 1e-9)
# Working bytes per (query, reference) pair of a screening block: the product plus selection
# workspace (argpartition's int64 positions; cdist's float64 values and argsort's int64 order).
_BYTES_PER_PAIR = {"torch": 8, "numpy": 16, "scipy": 24}


class SearchEngine:
    """Exact top-k search of one reference matrix by cosine or euclidean distance.

    Args:
        metric: "cosine" or "euclidean".
        backend: "torch" (CUDA or CPU), "numpy" (BLAS + argpartition) or "scipy" (cdist +
            argsort: the original CPU path, kept as a reference implementation).
        device: "cuda", "cpu" or None: CUDA when the backend is torch and CUDA is available.
        memory_budget_bytes: bytes the engine may use for distance blocks and refinement; None
            derives it from the memory available on the device at build.
        screening: "auto", "bf16", "int8" or "fp32": the screen's arithmetic (`screen`); results
            are the same with each, only speed differs.
    """

    def __init__(
        self,
        metric: str = "cosine",
        backend: str = "torch",
        device: str | None = None,
        memory_budget_bytes: int | None = None,
        screening: str = "auto",
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; expected one of {METRICS}")
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; expected one of {BACKENDS}")
        if memory_budget_bytes is not None and memory_budget_bytes < 1:
            raise ValueError(f"memory_budget_bytes must be positive, got {memory_budget_bytes}")
        if screening not in SCREENINGS:
            raise ValueError(f"unknown screening {screening!r}; expected one of {SCREENINGS}")
        self.metric = metric
        self.backend = backend
        self.device = resolve_device(backend, device)
        self.requested_screening = screening
        self.arithmetic = screen.FP32  # resolved at build
        self._requested_budget = memory_budget_bytes
        self._budget = 0
        self._references: PreparedReferences | None = None  # set by build
        self._buffers: dict[tuple[str, int], torch.Tensor] = {}  # workspaces reused across calls (`_buffer`)
        self._slots: dict[int, int] = {}  # thread id → its worker's buffer set (`knn_admission.run_blocks`)
        self._float32: SearchEngine | None = None  # auto's float32 screen of dense neighbourhoods

    @property
    def screening(self) -> str:
        """The arithmetic the built engine screens in: "fp32", "bf16", "fp16" or "int8"."""
        return self.arithmetic.name

    @property
    def n_references(self) -> int:
        """Number of reference rows searched."""
        return self._built().n

    @property
    def dim(self) -> int:
        """Embedding dimension the queries must have."""
        return self._built().dim

    def build(self, references: np.ndarray, kept: Path | None = None) -> SearchEngine:
        """Prepare `references` (n_ref, dim), float16 or float32; row i is reference index i.

        The matrix is read in chunks (`knn_reference`): a float16 or float32 C-contiguous array
        is kept, not copied, and a read-only ``np.memmap`` (the reference cache) is streamed from
        disk, never held whole in float32. Leave the array unchanged while the engine is in use.
        `kept`: a path prefix where a 16-bit screen's prepared operands are read from, or written
        to for the next build (`knn_reference`, kept operands); the caller vouches that files
        there were made from these very rows.
        """
        matrix = checked_references(references)
        self._references, self._buffers = None, {}
        with part("engine: screen chosen"):  # the start-up probe's products, the int8 estimate
            self.arithmetic = screen.resolve_screening(
                self.requested_screening, self.backend, self.device, self.metric
            )
            dim, largest = matrix.shape[1], None
            if (
                self.requested_screening == "auto"
                and knn_admission.applies(self)
                and dim <= screen.INT8_MAX_DIM
                and units.int8_sums_exactly()
            ):  # int8 where its estimated cost is the lower (`knn_choice`)
                block, seconds = knn_admission.REFERENCE_BLOCK, self._candidate_seconds(dim)
                largest = knn_choice.prefers_int8(matrix, self.arithmetic, block, seconds)
                self.arithmetic = self.arithmetic if largest is None else screen.INT8
        if self.arithmetic is screen.INT8 and dim > screen.INT8_MAX_DIM:
            raise screen.ScreeningError(
                f"lookup.screening 'int8' sums exactly up to {screen.INT8_MAX_DIM} dimensions, not {dim}"
            )
        with part("engine: references prepared"):  # a cache on the card: its copy there
            self._references = PreparedReferences(
                matrix, self.metric, self.arithmetic, self.device, kept, largest
            )
        self._budget = self._requested_budget or default_memory_budget(self.device)
        self._float32 = None
        auto_16 = self.requested_screening == "auto" and self.arithmetic.half
        if (auto_16 or self.arithmetic is screen.INT8) and knn_admission.applies(self):
            self._float32 = copy.copy(self)  # the same engine screening in float32 (`_dense_limit`)
            self._float32.arithmetic, self._float32._buffers = screen.FP32, {}
            self._float32._references = self._references.float32_view()
        return self

    def _dense_limit(self) -> float | None:
        """Candidates per query row, after the first reference block of the admission screen,
        beyond which a query block is screened in float32 instead (None: never).

        The 16-bit screen's window is ~2⁸ times float32's; on dense neighbourhoods (real 256-d
        embeddings whose nearest neighbours crowd within it, hundreds per query) the candidates'
        bookkeeping and refinement cost more than float32's slower product saves: measured on
        one thread, 1,500 queries × 13,000 references, 0.90 s against float32's 0.18 s (836
        candidates a row), where the neighbourhoods of the layer before gave 0.09 s against
        0.22 s (9 a row).
        The limit weighs the two per query row, from the start-up probe's float32 and bfloat16
        times of a multiply-add, t₃₂ and t₁₆ (`units.seconds_per_product`), and a candidate's
        cost c (`_CANDIDATE_SECONDS`: 0.66 µs measured so at 256 dimensions, taken as growing with
        them). When the first block of W of the n references (dimension d) holds C candidates,
        the rest hold about C(n - W)/W: going on costs C·(n/W)·c + (n - W)·d·t₁₆, the first
        block's bfloat16 product being spent either way; float32 costs n·d·t₃₂. It switches
        when C > W·d·(t₃₂ - t₁₆·(n - W)/n)/c.
        Only `screening="auto"` and the int8 screen (asked for for speed; its window is four to
        five times bf16's) switch: a pinned bf16 or float32 screen stays as pinned. The int8
        screen takes its own product's time (`units.int8_seconds_per_product`) for t₁₆.
        The answer is exact either way."""
        if self._float32 is None:
            return None
        n = self.n_references
        block = min(knn_admission.REFERENCE_BLOCK, n)
        float32, bfloat16 = units.seconds_per_product()
        if self.arithmetic is screen.INT8:
            bfloat16 = units.int8_seconds_per_product()  # its own product's time in the rule
        surplus = block * self.dim * (float32 - bfloat16 * (n - block) / n)
        return surplus / self._candidate_seconds(self.dim)

    @staticmethod
    def _candidate_seconds(dim: int) -> float:
        """A screened candidate's cost at `dim` dimensions (`_CANDIDATE_SECONDS`)."""
        return _CANDIDATE_SECONDS[0] + _CANDIDATE_SECONDS[1] * dim

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
        n_references, dim = self._built().shape
        n_queries, k, indptr, excluded, q32, q_sq_norms = search_arguments(
            queries, k, threshold, exclude, n_references, dim, self.metric, torch.get_num_threads()
        )
        if knn_admission.applies(self):
            blocks, workers = knn_admission.query_blocks(self, n_queries)
        else:
            query_block, workers = self._block_shape(n_queries)[0], 1
            blocks = [
                slice(start, min(start + query_block, n_queries))
                for start in range(0, n_queries, query_block)
            ]

        def run(block: slice) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            pointers = indptr[block.start : block.stop + 1]
            rows = np.repeat(np.arange(len(pointers) - 1), np.diff(pointers))
            exclusions = (rows, excluded[pointers[0] : pointers[-1]])
            found = self._search_query_block(
                q32[block], q_sq_norms[block], exclusions, k, threshold, tie_expansion
            )
            return np.arange(block.start, block.stop), *found

        with screen.exact_matmul_settings():
            parts = knn_admission.run_blocks(self, blocks, workers, run)
        return assemble_rows(n_queries, k, parts)

    def _built(self) -> PreparedReferences:
        if self._references is None:
            raise RuntimeError("SearchEngine.build(references) must be called before searching")
        return self._references

    def _buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A flat tensor of `numel` elements kept across calls: a fresh multi-MiB allocation is
        page-faulted in on every use, which on a busy machine costs as much as the product."""
        key = (name, self._slots.get(threading.get_ident(), 0))  # one set per worker (`knn_admission`)
        buffer = self._buffers.get(key)
        if buffer is None or buffer.numel() < numel or buffer.dtype != dtype:
            buffer = self._buffers[key] = torch.empty(numel, dtype=dtype, device=self.device)
        return buffer[:numel]

    def _block_shape(self, n_queries: int) -> tuple[int, int]:
        """(query rows, reference rows) of a screening block that fits the memory budget."""
        n_references, dim = self._built().shape
        per_pair = _BYTES_PER_PAIR[self.backend]
        if self.arithmetic is screen.INT8:  # int32 product, float64 values and factors, minima
            per_pair = 24
        per_reference = 8 * dim if self.backend == "scipy" else 0  # cdist's float64 copy
        per_reference += self._built().streamed_bytes_per_row()
        query_block = max(1, min(n_queries, _MIN_QUERY_BLOCK))
        reference_block = self._budget // (query_block * per_pair + per_reference)
        reference_block = min(n_references, max(1, reference_block))
        spare = self._budget - reference_block * per_reference
        query_block = min(max(n_queries, 1), max(1, spare // (reference_block * per_pair)))
        return query_block, reference_block

    def _settle(
        self,
        values: torch.Tensor,
        indices: torch.Tensor,
        pending: np.ndarray,
        offsets: torch.Tensor,
        bounds: torch.Tensor,
        exact_queries: torch.Tensor,
        k: int,
        threshold: float | None,
        tie_expansion: bool,
        complete: bool,
    ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
        """Of the screened rows `pending`, those whose screen proves its answer (module docstring;
        every one when `complete`: all references screened), refined and selected: (their positions
        in `pending`, (distances, indices)). `knn_aspect` settles each mask's rows with it too."""
        pending_device = torch.from_numpy(pending).to(self.device)
        scores = values + offsets[pending_device, None]
        low = high = scores
        if self.metric == "cosine" and self.arithmetic.output_unit:  # per score (`knn_bounds`, 4)
            rounding = screen.output_error(values, self.arithmetic)  # values: -p̃
            low, high = scores - rounding, scores + rounding
        enough, limit = screened_enough(
            high, k, bounds[pending_device], threshold, self.metric, self.dim, low=low
        )
        if complete:
            enough = torch.ones_like(enough)
            limit = torch.full_like(limit, math.inf)
        rows = enough.nonzero().squeeze(1)
        # scores above the limit cannot be kept (module docstring): not worth refining
        kept, candidates, queries = low[rows], indices[rows], exact_queries[pending_device[rows]]
        admissible = torch.isfinite(kept) & (kept <= limit[rows, None]) & (candidates >= 0)
        # the k of smallest screened score first: their refined distances narrow the limit
        # (`knn_bounds.refined_limit`), and the other candidates are refined only below it
        nearest = kept.masked_fill(~admissible, math.inf).topk(min(k, kept.shape[1]), largest=False)[1]
        first = torch.zeros_like(admissible).scatter_(1, nearest, True) & admissible
        distances = self._refine(queries, candidates, first)
        kth = distances.topk(k, largest=False)[0][:, -1] if distances.shape[1] >= k else None
        if kth is not None:
            narrowed = refined_limit(kth.double(), bounds[pending_device[rows]], self.metric, self.dim)
            admissible &= kept <= narrowed[:, None]
        later = self._refine(queries, candidates, admissible & ~first)
        distances = torch.minimum(distances, later)
        return rows.cpu().numpy(), _select(distances, candidates, k, threshold, tie_expansion)

    def _search_query_block(
        self,
        q32: np.ndarray,
        q_sq_norms: np.ndarray,
        exclusions: Exclusions,
        k: int,
        threshold: float | None,
        tie_expansion: bool,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Screen, check sufficiency (module docstring), refine and select for a query block."""
        n_rows, n_references = len(q32), self.n_references
        margin = _SCREEN_MARGIN["half" if self.arithmetic.half else "fp32"]
        pending, width, parts = np.arange(n_rows), min(k + margin, n_references), []
        admission, threads = knn_admission.applies(self), torch.get_num_threads()
        # the admission screen runs its small operations on this thread (`knn_admission`)
        with knn_admission.single_threaded() if admission else contextlib.nullcontext():
            fast_queries, offsets, exact_queries, bounds = self._prepare_queries(q32, q_sq_norms)
            bounds = torch.from_numpy(bounds).to(self.device)
            offsets = torch.from_numpy(offsets).to(self.device)
            found = None
            if admission:
                found = knn_admission.screen(
                    self, fast_queries, bounds, exclusions, k, threshold, threads, self._dense_limit()
                )
            if found is not None:
                values, indices, screened = found
                done, selected = self._settle(
                    values, indices, screened, offsets, bounds, exact_queries,
                    k, threshold, tie_expansion, complete=False,
                )  # fmt: skip
                parts.append((screened[done], *selected))
                pending = np.setdiff1d(pending, screened[done])
        if admission and found is None:  # a dense neighbourhood: float32 screens it faster
            return self._float32._search_query_block(q32, q_sq_norms, exclusions, k, threshold, tie_expansion)
        while pending.size:
            pending_exclusions = exclusions_for_rows(exclusions, pending, n_rows)
            values, indices = self._screen(fast_queries[pending], pending_exclusions, width)
            done, selected = self._settle(
                values, indices, pending, offsets, bounds, exact_queries,
                k, threshold, tie_expansion, complete=width == n_references,
            )  # fmt: skip
            parts.append((pending[done], *selected))
            pending = np.delete(pending, done)
            width = min(width * _MARGIN_GROWTH, n_references)
        return assemble_rows(n_rows, k, parts)

    def _prepare_queries(
        self, q32: np.ndarray, q_sq_norms: np.ndarray
    ) -> tuple[np.ndarray | torch.Tensor, np.ndarray, torch.Tensor, np.ndarray]:
        """(screening operands (b, dim), score offsets (b,), refinement form (b, dim) float64,
        error bounds δ (b,)).

        torch and numpy screen on block values ``-q̂·r̂`` (cosine, offset 1) or ``‖r‖² - 2z·r``
        (euclidean, offset ‖z‖², z the query less the centre): negating and doubling are exact
        and fold the score's arithmetic into the matrix product. cdist returns the score itself
        (offset 0).
        """
        centred_norms = np.sqrt(q_sq_norms)
        if self.backend == "torch":  # element-wise on the device: the bits numpy's would have
            rows = torch.from_numpy(q32).to(self.device)
            exact = rows.double()
            if self.metric == "cosine":
                scale = torch.from_numpy(inverse_norms(q_sq_norms)).to(self.device)
                exact *= scale[:, None]
                prepared, offsets = (rows * scale.float()[:, None]).neg_(), np.ones(len(q32))
            else:
                if self._references.centre is not None:
                    rows = rows - self._references.centre
                    q_sq_norms = rows.double().square().sum(1).cpu().numpy()
                    centred_norms = np.sqrt(q_sq_norms)
                prepared, offsets = -2 * rows, q_sq_norms
        else:
            exact = torch.from_numpy(q32).to(self.device, torch.float64)
            if self.metric == "cosine":
                inverse = inverse_norms(q_sq_norms)
                exact *= torch.from_numpy(inverse).to(self.device)[:, None]
                prepared = q32 * inverse.astype(np.float32)[:, None]
                offsets = np.zeros(len(q32)) if self.backend == "scipy" else np.ones(len(q32))
                if self.backend != "scipy":
                    prepared = -prepared
            elif self.backend == "scipy":
                prepared, offsets = q32, np.zeros(len(q32))
            else:
                prepared, offsets = -2 * q32, q_sq_norms
        operands, stats = screen.to_operands(torch.as_tensor(prepared), self.arithmetic)
        stats.update(offset=offsets, centred_norm=centred_norms)
        bounds = screening_error_bound(self.metric, self.dim, self.arithmetic, stats, self._references.stats)
        fast = prepared if self.backend != "torch" else operands
        return fast, offsets, exact, bounds

    def _screen(
        self, fast_queries: np.ndarray | torch.Tensor, exclusions: Exclusions, width: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The `width` smallest block values per query, over reference blocks sized for b queries.

        Returns (values float64 (b, width), indices int64 (b, width)) on the device, unordered;
        excluded references and padding have value +inf (padding has index -1).
        """
        shape, reference_block = (len(fast_queries), width), self._block_shape(len(fast_queries))[1]
        if self.backend == "torch":
            xp, queries = torch, fast_queries
            rows, cols = (torch.from_numpy(pairs).to(self.device) for pairs in exclusions)
            best_values = torch.full(
                shape, math.inf, dtype=screen.value_dtype(self.arithmetic), device=self.device
            )
            best_indices = torch.full(shape, -1, dtype=torch.int64, device=self.device)
            buffers = self._product_buffers(len(fast_queries) * reference_block)
        else:
            xp, queries, (rows, cols) = np, fast_queries, exclusions
            best_values, best_indices = np.full(shape, np.inf), np.full(shape, -1, dtype=np.int64)
            buffers = []
        for start in range(0, self.n_references, reference_block):
            stop = min(start + reference_block, self.n_references)
            values = self._block_values(queries, start, stop, buffers)
            if len(cols):
                in_block = (cols >= start) & (cols < stop)
                values[rows[in_block], cols[in_block] - start] = math.inf
            count = min(width, stop - start)
            if self.backend == "scipy":
                positions = np.argsort(values, axis=1)[:, :width]
            elif self.backend == "numpy":
                positions = screen.smallest_positions(values, count)
            else:
                positions = screen.smallest_columns(
                    values, count, self._buffer("minima", values.numel() // 2, values.dtype)
                )
            candidates = screen.take(values, positions)
            if self.backend == "torch":  # 16-bit values widen exactly
                candidates = candidates.to(screen.value_dtype(self.arithmetic))
            merged_values = xp.concatenate((best_values, candidates), axis=1)
            merged_indices = xp.concatenate((best_indices, positions + start), axis=1)
            keep = screen.smallest_positions(merged_values, width)
            best_values, best_indices = screen.take(merged_values, keep), screen.take(merged_indices, keep)
        if self.backend == "torch":
            return best_values.double(), best_indices
        return tuple(torch.from_numpy(best).to(self.device) for best in (best_values, best_indices))

    def _product_buffers(self, size: int) -> list[torch.Tensor]:
        """Workspaces of torch's block values (`_block_values`) for `size` pairs: the product, and
        the float32 ṽ + w of a 16-bit euclidean screen or the int8 screen's float64 values."""
        buffers = [self._buffer("product", size, screen.output_dtype(self.arithmetic))]
        if self.arithmetic.half and self.metric == "euclidean":
            buffers.append(self._buffer("sum", size, torch.float32))
        elif self.arithmetic is screen.INT8:
            buffers.append(self._buffer("scaled", size, torch.float64))
        return buffers

    def _block_values(
        self, queries: np.ndarray | torch.Tensor, start: int, stop: int, buffers: list[torch.Tensor]
    ) -> np.ndarray | torch.Tensor:
        """Screening values of all queries against references [start, stop): (b, stop - start).

        torch writes into `buffers` (flat tensors of at least b × (stop - start) elements).
        """
        block = self._references.operand_block(start, stop)
        if self.backend == "torch":
            shape = (len(queries), stop - start)
            if self.arithmetic is screen.INT8:
                return screen.int8_product(
                    queries, block, self._references.operand_scales(start, stop), buffers
                )
            if self.metric == "cosine":
                return screen.product(queries, block, self.arithmetic, buffers[0])
            w = self._references.sq_norms[start:stop]
            if not self.arithmetic.half:  # fused: w joins the float32 sum
                out = buffers[0][: shape[0] * shape[1]].view(shape)
                return torch.addmm(w, queries, block.T, out=out)
            values = screen.product(queries, block, self.arithmetic, buffers[0])
            return torch.add(values, w, out=buffers[1][: shape[0] * shape[1]].view(shape))
        block = block.numpy()  # the CPU backends share the tensor's memory
        if self.backend == "numpy":
            values = queries @ block.T
            if self.metric == "euclidean":
                values += self._references.sq_norms[start:stop].numpy()
            return values
        values = cdist(queries, block, "cosine" if self.metric == "cosine" else "sqeuclidean")
        if self.metric == "cosine":
            values[np.isnan(values)] = 1.0  # cdist's 0/0 for zero-norm rows: see module docstring
        return values

    def _refine(
        self, exact_queries: torch.Tensor, indices: torch.Tensor, admissible: torch.Tensor
    ) -> torch.Tensor:
        """Exact distances, float32 (b, m) (+inf where not admissible), of screened candidates.

        Computed in float64 for the admissible (row, candidate) pairs only, a chunk of pairs at a
        time small enough that the float64 operands stay in cache: the cost is the gather of the
        few candidate rows, not a pass over padded (b, m, dim) blocks.
        """
        if self.device.type == "cpu":
            return torch.from_numpy(
                self._refine_on_host(exact_queries.numpy(), indices.numpy(), admissible.numpy())
            )
        return self._refine_on_device(exact_queries, indices, admissible, self._device_refine_pairs())

    def _device_refine_pairs(self) -> int:
        """Pairs refined per step on a GPU: enough that a search's refinement is a few large
        steps rather than thousands of small launches, each a few microseconds of the card's
        time and more of the host's, with the float64 operands within a share of the budget."""
        share = min(_DEVICE_REFINE_BYTES, self._budget // 4)
        return max(_REFINE_PAIRS, share // (16 * self.dim))

    def _refine_on_device(
        self, exact_queries: torch.Tensor, indices: torch.Tensor, admissible: torch.Tensor, step: int
    ) -> torch.Tensor:
        """`_refine` in torch, `step` pairs at a time. Each pair's float64 sum runs in one fixed
        order, element-wise halving (`pairwise_row_sums`), so a distance depends on its pair
        alone, not on `step`, on the count of pairs refined with it, or on the card's choice of
        reduction kernel for that count."""
        rows, columns = admissible.nonzero(as_tuple=True)
        chosen = indices[rows, columns]
        distances = torch.full(indices.shape, math.inf, dtype=torch.float64, device=indices.device)
        for start in range(0, len(chosen), step):
            pairs = slice(start, start + step)
            candidates = self._references.rows(chosen[pairs]).double()  # float32 → float64 exactly
            query = exact_queries.index_select(0, rows[pairs])
            if self.metric == "cosine":
                exact = (1.0 - pairwise_row_sums(candidates.mul_(query))).clamp_(0.0, 2.0)
            else:
                exact = pairwise_row_sums(candidates.sub_(query).square_()).sqrt_()
            distances[rows[pairs], columns[pairs]] = exact
        return distances.float()

    def _refine_on_host(
        self, exact_queries: np.ndarray, indices: np.ndarray, admissible: np.ndarray
    ) -> np.ndarray:
        """`_refine` on the CPU (`knn_reference.PreparedReferences.exact_distances`), on one
        thread, so that its many small steps wait on no thread pool (on a loaded machine each
        parallel region of a small op can cost a scheduler time slice)."""
        rows, columns = np.nonzero(admissible)
        distances = np.full(indices.shape, np.inf, dtype=np.float32)
        with knn_admission.single_threaded():  # torch widens float16 rows there (`exact_distances`)
            chosen = indices[rows, columns]
            distances[rows, columns] = self._references.exact_distances(exact_queries, rows, chosen)
        return distances


def pairwise_row_sums(terms: torch.Tensor) -> torch.Tensor:
    """Row sums of `terms` (n, d), summed in place by halving: the first ⌊w/2⌋ columns take the
    next ⌊w/2⌋ element-wise, an odd last column moves up, until one column is left. Element-wise
    operations round each element alone, so a row's sum follows one order fixed by d, whatever
    n, the device or the kernels torch picks; a reduction kernel may split rows differently by
    shape. Overwrites `terms`."""
    width = terms.shape[1]
    if width == 0:
        return terms.new_zeros(terms.shape[0])
    while width > 1:
        half = width // 2
        terms[:, :half] += terms[:, half : 2 * half]
        if width % 2:
            terms[:, half] = terms[:, width - 1]
        width = half + width % 2
    return terms[:, 0].clone()


def _select(
    distances: torch.Tensor, indices: torch.Tensor, k: int, threshold: float | None, ties: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Order refined candidates by (distance, index) and keep the answer: host arrays (b, K_b).

    In numpy on the host (`knn_inputs.select_answer`, every engine's rule): the arrays are small
    (b × m), and on a loaded machine each of the dozen small torch operations would wait on the
    thread pool longer than it computes."""
    return select_answer(distances.cpu().numpy(), indices.cpu().numpy(), k, threshold, ties)
