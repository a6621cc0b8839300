"""The ``"auto"`` screen's choice of the int8 screen on the CPU (`knn.SearchEngine.build`).

Every screen returns the float64 oracle's answer; they differ in speed, by machine and by data.
Per query row, over n references of d dimensions, a screen costs its product, n·d·t (t its
multiply-add's time on one thread here, `units`), and its candidates' bookkeeping and
refinement, C·c (c per candidate, `knn._CANDIDATE_SECONDS`). int8 products run about twice
bfloat16's rate on VNNI or AMX-INT8 units, but its operands round coarser, so its window (the
bound δ of `knn_bounds`, about 4-5 times bfloat16's on unit vectors) holds more candidates.
Measured with two threads, k = 5: on synthetic 1,024-d families (124,000 references) int8
searches in about 0.6 × bfloat16's time; on the shared real sets (NEAR's 256-d layers against
13,000 human references, AntiBERTy's 512-d against 3,000) in 0.9 to 1.4 × of it (0.24 × on
NEAR's layer 1, whose crowded bfloat16 window costs more still), its window holding three to
ten times bfloat16's candidates.

So the build estimates both before preparing either's operands. `SAMPLE_ROWS` reference rows
spread over the matrix stand for the queries (a row's match with itself left out); against the
first block of W = `knn_admission.REFERENCE_BLOCK` references they give, in float32, each row's
k-th largest similarity p_k (k = `NOMINAL_K`, SPEC's default: the engine is built before it
knows k), and each screen's bound for that row (`knn_bounds.screening_error_bound`: the block's
operands stand for the references', and the int8 factor comes from a pass over all of them,
`largest_unit_component`, whose result the build then uses). A screen's candidates in the block
are the similarities within 2δ + 2h of p_k (h: the bfloat16 output's rounding at p_k,
`screen.output_error`), as its admission screen keeps them (`knn_admission`); over the matrix,
n/W blocks of them. The int8 screen is chosen where its estimated cost is the lower. An
estimate: a wrong choice costs speed, never a different answer.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import torch

from . import screen, units
from .knn_bounds import screening_error_bound
from .knn_inputs import in_parallel, inverse_norms, row_sq_norms
from .resident import release_rows
from .units import single_threaded

SAMPLE_ROWS = 128
NOMINAL_K = 5
_STAT_ROWS = 2048  # block rows whose operands stand for the references' in the bound
_PASS_ROWS = 4096  # rows per chunk of `largest_unit_component`'s pass: 8-16 MiB at 1,024 dims

log = logging.getLogger(__name__)


def prefers_int8(
    matrix: np.ndarray, current: screen.Arithmetic, block: int, candidate_seconds: float
) -> float | None:
    """The largest component of `matrix`'s unit rows (`largest_unit_component`) when the int8
    screen is estimated faster than `current` (bfloat16 or float32) on the cosine screen of
    `matrix` (n, d), else None (module docstring); `block`: the admission screen's reference
    rows per block; `candidate_seconds`: c at this dimension."""
    n, dim = matrix.shape
    if n <= 1 or dim == 0:
        return None
    block = min(block, n)
    largest = largest_unit_component(matrix)
    sample = np.unique(np.linspace(0, n - 1, min(SAMPLE_ROWS, n)).astype(np.int64))
    queries = _unit_rows(matrix[sample])
    references = _unit_rows(matrix[:block])
    with torch.no_grad():
        similarity = (queries @ references.T).double()
    inside = sample < block  # a sample row's match with itself
    similarity[np.flatnonzero(inside), sample[inside]] = -np.inf
    k = min(NOMINAL_K, block - 1) if block > 1 else 1
    kth = similarity.topk(k, dim=1)[0][:, -1]
    stats_rows = references[np.unique(np.linspace(0, block - 1, min(_STAT_ROWS, block)).astype(np.int64))]
    blocks = n / block
    float32, bfloat16 = units.seconds_per_product()
    product = {screen.INT8.name: units.int8_seconds_per_product()}
    product[current.name] = bfloat16 if current.half else float32
    cost = {}
    for arithmetic in (current, screen.INT8):
        rounding = screen.output_error(kth, arithmetic)  # h at p_k: 0 for an exact output
        window = 2 * _bounds(queries, stats_rows, arithmetic, largest) + 2 * rounding
        candidates = float((similarity >= (kth - window)[:, None]).sum(1).double().mean())
        cost[arithmetic.name] = (
            n * dim * product[arithmetic.name] + candidates * blocks * candidate_seconds,
            candidates,
        )
    log.debug("screen estimates per query row (seconds, candidates per block): %s", cost)
    return largest if cost[screen.INT8.name][0] < cost[current.name][0] else None


def largest_unit_component(matrix: np.ndarray) -> float:
    """An upper bound on the largest magnitude of a component of `matrix`'s rows scaled to unit
    norm, from one pass in chunks on torch's thread count of workers (a memmap's pages released
    as it goes): max |r_i|/‖r‖ over the float32 rows, raised by 2⁻¹⁶ for the float32 norms here
    and the rounding of the engine's own unit rows (a component beyond it would only be clamped,
    its residual measured as ever). The int8 screen's shared factor comes from it
    (`screen.shared_int8_factor`); the window depends on it through every reference's residual,
    so one outlying row anywhere counts."""
    found = [0.0]

    def measure(first: int, last: int) -> None:
        with single_threaded():
            for start in range(first, last, _PASS_ROWS):
                stop = min(start + _PASS_ROWS, last)
                with warnings.catch_warnings():  # read, never written: float() makes a new tensor
                    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
                    rows = torch.from_numpy(np.asarray(matrix[start:stop]))
                rows = rows.float() if rows.dtype != torch.float32 else rows
                if rows.numel():
                    norms = torch.linalg.vector_norm(rows, dim=1).double()
                    magnitudes = torch.maximum(rows.amax(1), rows.amin(1).neg()).double()
                    ratios = torch.where(norms > 0, magnitudes / norms, 0.0)  # zero rows: no direction
                    found.append(float(ratios.max()))
                release_rows(matrix, start, stop)

    in_parallel(len(matrix), torch.get_num_threads(), measure)
    return max(found) * (1 + 2.0**-16)


def _unit_rows(rows: np.ndarray) -> torch.Tensor:
    """float32 rows × fl(1/‖row‖), as the engine prepares cosine rows (`knn_reference`)."""
    rows = np.array(rows, dtype=np.float32)  # a copy: torch may write it
    scale = inverse_norms(row_sq_norms(rows, "references", "cosine")).astype(np.float32)
    return torch.from_numpy(rows) * torch.from_numpy(scale)[:, None]


def _bounds(
    queries: torch.Tensor, references: torch.Tensor, arithmetic: screen.Arithmetic, largest: float
) -> torch.Tensor:
    """The cosine bound δ per query row (float64) of `arithmetic` with `references` standing for
    the matrix's, and the int8 screen's shared factor from the matrix's `largest` component."""
    factor = screen.shared_int8_factor(largest) if arithmetic is screen.INT8 else None
    _, reference_stats = screen.to_operands(references, arithmetic, unit_rows=True, int8_factor=factor)
    maxima = {name: float(values.max()) for name, values in reference_stats.items()}
    maxima.update(relative_residual=0.0, centred=0.0)
    _, query_stats = screen.to_operands(-queries, arithmetic)
    query_stats.update(offset=np.ones(len(queries)), centred_norm=np.ones(len(queries)))
    bound = screening_error_bound("cosine", queries.shape[1], arithmetic, query_stats, maxima)[:, 0]
    return torch.from_numpy(bound)
