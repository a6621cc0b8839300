"""The k-NN engine's cosine screen on the CPU by admission thresholds: selecting from the product
costs a small fraction of the product itself.

`knn` proves that a reference can be in a query's answer only if its fast score s̃ is at most a
limit L(s̃_(k)) that grows with the k-th smallest fast score s̃_(k) (`knn_bounds.screened_enough`).
The k-th smallest fast score over any subset of the references is at least s̃_(k), so L of it is
an upper bound on the true limit: the *admission limit*. Screening in blocks of references, the
engine keeps, per query, every reference whose fast score is within the query's admission limit
at the time its block is screened (the *candidates*), and tightens the limit from the candidates
kept so far. The candidates hold every reference of fast score ≤ L(s̃_(k)) (each was admitted by
a limit at least as large), the k of smallest fast score among them, and so everything
`SearchEngine._settle` needs to prove, refine and select the answer exactly as from a top-m
screen; a padding column of +inf tells it that no reference was left out below the limit.

Why it is cheap. Cosine scores are s̃ = 1 - p with p = q̃·r̃ the product of the (negated) operands.
A product rounded to a 16-bit output moved by at most h(p) (`screen.output_error`), so the limit
L bounds s̃ - h(p) (`knn_bounds`, item 4): a reference is admitted when p ≥ τ, τ the smallest
number of the product's type with τ + h(τ) ≥ t, t = 1 - L less a slack of 2⁻⁴⁰(1 + |L|) (for a
float32 output, h = 0 and τ is t rounded down). As p + h(p) grows with p, a reference left out
has p + h(p) < t, so 1 - p - h(p) > L + 2⁻⁴⁰(1 + |L|), and the float64 value of it that
`SearchEngine._settle` compares with L (relative error 2⁻⁵², 1 - p ≤ 3) is still above L. The
k-th largest p found so far enters L as the score s̃ + h(p) of the k-th (`_limits`). When τ > 0
the test needs no floating-point compare: non-negative IEEE numbers
order like their bit patterns read as signed integers of the same width, and negative numbers
read as negative integers, so p ≥ τ exactly when bits(p) ≥ bits(τ) (-0, negative numbers, -inf:
never admitted, rightly). One pass of integer maxima over the block's product, along contiguous
columns, gives each group of 32 columns (column c in group c mod G, G = width / 32) its largest
p; only groups whose maximum reaches τ are gathered and compared member by member, and on real
neighbourhoods those are one or two per query and block. Before the first block has been
screened a query has no limit: the k-th largest of that block's group maxima, when positive, is a
lower bound on its k-th largest p (the k groups of largest maxima hold k distinct references at
least that large), from which the first τ is set. Rows whose τ is not positive (a zero-norm
query; a neighbourhood where every similarity is ≤ 0 within the bound), and rows that collect more
than `_MAX_CANDIDATES` candidates (mass ties, duplicated references), are left to the engine's
top-m screen, which proves them in its own way.

The int8 screen (`screen.ScaledRows`) has an exact int32 product P per pair and p = P·fl(c·d) in
float64, c the query's factor and d the one factor every reference shares: one rounding, monotone
in P. So it selects on P as the others select on bits: a query's τ becomes the smallest integer
P with fl(P·fl(c·d)) ≥ τ (`_integer_reaching`), and its candidates' p are computed at the end.

No new rounding enters: negating an operand negates every product and partial sum exactly, so p
is -ṽ for the kernel's order of summation, the very quantity `knn_bounds` bounds for any order
(the bf16 output rounding per score, item 4); τ is taken at or below the limit's reach, which
only widens the admission.

Workers. The screen's bookkeeping and the refinement after it run on one thread, between
products that use them all; a search of many queries is therefore cut into blocks that up to
torch's thread count of workers screen at once, each running torch on its own thread
(`query_blocks`, `run_blocks`), so that no core idles while another selects or refines.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
import torch

from .knn_bounds import screened_enough
from .knn_inputs import Exclusions
from .screen import Arithmetic, ScaledRows, output_dtype, output_error
from .units import int8_mm, single_threaded

if TYPE_CHECKING:
    from .knn import SearchEngine

GROUP = 32  # columns per group of maxima
# Reference rows per block: oneDNN's bf16 kernel runs near its peak from this width on (measured
# 2,000 × 16,384 against 1,000 × 4,096: ~25% more GFLOP/s), the per-block bookkeeping is
# amortised, and the first block, which sets the first limits, holds more of each neighbourhood.
REFERENCE_BLOCK = 16384
_MAX_CANDIDATES = 2048  # per query: beyond this the top-m screen is cheaper than collecting
_SLACK = 2.0**-40  # relative: covers the float64 1 - p of the settle step and of τ = 1 - L
_INTEGER = {
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
    torch.float32: torch.int32,
    torch.int32: torch.int32,
}
# Query rows per worker below which splitting the queries among threads stops paying: a product
# of fewer rows loses efficiency, and each worker streams every reference block once.
_MIN_WORKER_ROWS = 128
# Query rows per block beyond which several workers' blocks are cut smaller: a worker that other
# processes slow down leaves the others idle at the end for up to one block (measured 0.8 s of
# 19 s with 2,500-row blocks), while single-threaded products of 1,250 to 5,000 rows run at the
# same speed (thread CPU time, 1,024 dims, 16,384 references; 625 rows: 10% slower).
_MAX_WORKER_ROWS = 1280


def block_shape(
    budget: int, n_queries: int, n_references: int, streamed_bytes_per_row: int
) -> tuple[int, int]:
    """(query rows, reference rows) of the admission screen's blocks within `budget` bytes: the
    product (at most 4 bytes per pair) and its group maxima (1/32 of that) take under 5 bytes per
    pair, beside the operands a memory-mapped float32 screen makes per block. The reference rows
    shrink from `REFERENCE_BLOCK` only when 256 query rows would not fit."""
    references = min(REFERENCE_BLOCK, n_references)
    while references > GROUP and budget < references * (streamed_bytes_per_row + 5 * min(n_queries, 256)):
        references //= 2
    spare = budget - references * streamed_bytes_per_row
    return max(1, min(n_queries, spare // (5 * references))), references


def query_blocks(engine: SearchEngine, n_queries: int) -> tuple[list[slice], int]:
    """(query blocks, workers) of a search: the rows `block_shape` fits in the budget, shared
    among up to torch's thread count of workers (`run_blocks`), in blocks of nearly equal size
    (at most `_MAX_WORKER_ROWS` with several workers) and a whole number of rounds, so that no
    worker is left alone with a short last block."""
    workers = max(1, min(torch.get_num_threads(), n_queries // _MIN_WORKER_ROWS))
    references = engine._built()
    rows = block_shape(engine._budget, n_queries, references.n, references.streamed_bytes_per_row())[0]
    per_worker = rows // workers if workers == 1 else min(rows // workers, _MAX_WORKER_ROWS)
    count = -(-n_queries // max(1, per_worker))
    count = min(n_queries, -(-count // workers) * workers)
    return [slice(i * n_queries // count, (i + 1) * n_queries // count) for i in range(count)], workers


def run_blocks(
    engine: SearchEngine, blocks: list[slice], workers: int, run: Callable[[slice], tuple]
) -> list[tuple]:
    """`run` of every block, in order. With several workers each runs whole blocks, torch on its
    own thread and its own buffers: the screen's selection, refinement and bookkeeping run on
    one thread (`single_threaded`), so a search on a single block leaves the other cores idle
    between products; workers keep every core busy instead, and no worker waits on another's
    threads (no parallel region spans them). Each block's answer is exact whatever the blocks,
    so the result does not depend on them."""
    if workers == 1:
        return [run(block) for block in blocks]
    slots: queue.SimpleQueue[int] = queue.SimpleQueue()
    for slot in range(workers):
        slots.put(slot)

    def task(block: slice) -> tuple:
        slot = slots.get()
        engine._slots[threading.get_ident()] = slot
        torch.set_num_threads(1)  # this thread's own setting, read by its products
        try:
            return run(block)
        finally:
            slots.put(slot)

    try:
        with single_threaded(), ThreadPoolExecutor(workers, thread_name_prefix="knn-search") as pool:
            return list(pool.map(task, blocks))
    finally:
        engine._slots.clear()


def applies(engine: SearchEngine) -> bool:
    """Whether `engine` screens by admission thresholds: torch's cosine screen on the CPU."""
    return engine.backend == "torch" and engine.metric == "cosine" and engine.device.type == "cpu"


class _Candidates:
    """Admitted (row, reference, bits of p) triples, the running k largest p per row and τ, as
    host arrays: the bookkeeping is a few small operations per block, which numpy runs on the
    calling thread instead of waking torch's pool for each (on a busy machine each wake-up can
    cost a scheduler slice)."""

    def __init__(self, n_rows: int, k: int, integer: np.dtype):
        self.k, self.integer = k, integer
        self.smallest, self.largest = np.iinfo(integer).min, np.iinfo(integer).max
        self.rows: list[np.ndarray] = []
        self.columns: list[np.ndarray] = []
        self.bits: list[np.ndarray] = []
        self.counts = np.zeros(n_rows, dtype=np.int64)
        self.best = np.full((n_rows, k), self.smallest, dtype=integer)  # k largest p (bits) so far
        self.tau = np.full(n_rows, self.largest, dtype=integer)  # admits nothing
        self.left = np.zeros(n_rows, dtype=bool)  # rows handed back to the top-m screen

    def add(self, rows: np.ndarray, columns: np.ndarray, bits: np.ndarray) -> None:
        """New candidates, `rows` ascending."""
        if not len(rows):
            return
        self.rows.append(rows)
        self.columns.append(columns)
        self.bits.append(bits)
        new = np.bincount(rows, minlength=len(self.counts))
        self.counts += new
        # the k largest of each row's new candidates join the running k largest: sorted by row,
        # then value, the last k of each row (a row of many candidates, near-duplicates, would
        # widen a dense (rows × most new) partition for every row)
        n_rows = len(self.counts)
        every_row = np.concatenate((np.repeat(np.arange(n_rows), self.k), rows))
        every = np.concatenate((self.best.reshape(-1), bits))
        ordered = every[np.lexsort((every, every_row))]
        ends = np.cumsum(new + self.k)
        self.best = ordered[ends[:, None] - self.k + np.arange(self.k)]
        overflowing = self.counts > _MAX_CANDIDATES
        self.left |= overflowing
        self.tau[overflowing] = self.largest


def screen(
    engine: SearchEngine, fast_queries: torch.Tensor, bounds: torch.Tensor, exclusions: Exclusions, k: int,
    threshold: float | None, threads: int, dense: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray] | None:  # fmt: skip
    """Candidates of every row of `fast_queries` (the engine's cosine operands, -q̂ rounded).

    Call it inside `single_threaded()`; the products run on `threads` threads. Returns (values
    float64 (b', m + 1), indices int64 (b', m + 1), rows (b',) of the rows it screened), in
    `SearchEngine._screen`'s convention (block values -p, +inf and -1 padding); the rows not
    returned are left to the top-m screen (module docstring). `dense`: when its rows hold more
    candidates than this on average after the first block, it stops and returns None
    (`SearchEngine._search_query_block`: such neighbourhoods are screened in float32).
    """
    references, arithmetic = engine._references, engine.arithmetic
    n_rows, n_references = len(fast_queries), references.n
    positive = fast_queries.neg()  # exact
    out_dtype = output_dtype(arithmetic)
    integer = _INTEGER[out_dtype]
    scaled = isinstance(positive, ScaledRows)  # the int8 screen (module docstring)
    found = _Candidates(n_rows, k, np.dtype(str(integer).removeprefix("torch.")))
    unit = None  # the int8 screen's fl(c·d) per row: c·d of two float32 numbers, exact in float64
    if scaled:
        unit = positive.scale.double().numpy() * float(references.operand_scales(0, 1)[0])
    excluded_rows, excluded_columns = (torch.from_numpy(pairs) for pairs in exclusions)
    block = block_shape(engine._budget, n_rows, n_references, references.streamed_bytes_per_row())[1]
    product = engine._buffer("product", n_rows * block, out_dtype)
    maxima = engine._buffer("maxima", n_rows * (block // GROUP), integer)
    limits = (bounds, threshold, engine.dim, arithmetic, unit)
    for start in range(0, n_references, block):
        stop = min(start + block, n_references)
        width = stop - start
        values = product[: n_rows * width].view(n_rows, width)
        operands = references.operand_block(start, stop)
        with single_threaded(threads):
            if scaled:
                int8_mm(positive.values, operands, values)
            elif out_dtype == arithmetic.dtype:
                torch.mm(positive, operands.T, out=values)
            else:
                torch.mm(positive, operands.T, out_dtype=out_dtype, out=values)
        if len(excluded_columns):
            in_block = (excluded_columns >= start) & (excluded_columns < stop)
            never = torch.iinfo(torch.int32).min if scaled else -math.inf  # never admitted: τ > 0
            values[excluded_rows[in_block], excluded_columns[in_block] - start] = never
        bits = values.view(integer)
        groups = width // GROUP
        group_maxima = _group_maxima(bits, groups, maxima)
        if start == 0:
            _first_limits(found, group_maxima, bits[:, groups * GROUP :].numpy(), *limits)
            # each group reaching τ holds a candidate: a dense block is known before gathering
            if (
                dense is not None
                and group_maxima is not None
                and np.count_nonzero(group_maxima >= found.tau[:, None]) > dense * n_rows
            ):
                return None
        _admit(found, bits.numpy(), group_maxima, groups, start)
        _tighten(found, *limits)
        if start == 0 and dense is not None and found.counts.sum() > dense * n_rows:
            return None
    return _collected(found, n_rows, out_dtype, unit)


def _group_maxima(bits: torch.Tensor, groups: int, scratch: torch.Tensor) -> np.ndarray | None:
    """Integer maxima (b, groups) of the groups of 32 columns of `bits[:, :32·groups]`, column c
    in group c mod `groups`: one pass over the block, whose inner loop runs along contiguous
    columns; None if there is no whole group."""
    if groups == 0:
        return None
    out = scratch[: len(bits) * groups].view(len(bits), groups)
    return torch.amax(bits[:, : groups * GROUP].unflatten(1, (GROUP, groups)), 1, out=out).numpy()


def _first_limits(
    found: _Candidates, group_maxima: np.ndarray | None, tail: np.ndarray, bounds: torch.Tensor,
    threshold: float | None, dim: int, arithmetic: Arithmetic, unit: np.ndarray | None = None,
) -> None:  # fmt: skip
    """τ of every row from the first block's k-th largest group maximum (module docstring);
    rows where it is not positive are left to the top-m screen."""
    pool = tail if group_maxima is None else np.concatenate((group_maxima, tail), axis=1)
    if pool.shape[1] >= found.k:
        lower = np.partition(pool, pool.shape[1] - found.k, axis=1)[:, -found.k]
    else:
        lower = np.full(len(pool), found.smallest, dtype=found.integer)
    found.tau = _limits(lower, bounds, threshold, dim, arithmetic, unit)
    found.left = found.tau < 1
    found.tau[found.left] = found.largest


def _admit(
    found: _Candidates, bits: np.ndarray, group_maxima: np.ndarray | None, groups: int, start: int
) -> None:
    """Candidates of one block: members of groups whose maximum reaches τ, and tail columns."""
    tau, width = found.tau, bits.shape[1]
    body = groups * GROUP
    if group_maxima is not None:
        hits = np.flatnonzero(group_maxima >= tau[:, None])  # row-major: rows ascending
        if len(hits):
            hit_rows, hit_groups = np.divmod(hits, groups)
            # member j of group g is column g + j·groups: a view, gathered without an index array
            member_bits = bits[:, :body].reshape(len(bits), GROUP, groups)[hit_rows, :, hit_groups]
            admitted = np.flatnonzero(member_bits >= tau[hit_rows, None])
            which, member = np.divmod(admitted, GROUP)
            columns = hit_groups[which] + member * groups
            found.add(hit_rows[which], columns + start, member_bits.reshape(-1)[admitted])
    if body < width:
        tail = bits[:, body:]
        admitted = np.flatnonzero(tail >= tau[:, None])
        rows, columns = np.divmod(admitted, width - body)
        found.add(rows, columns + body + start, tail.reshape(-1)[admitted])


def _tighten(
    found: _Candidates, bounds: torch.Tensor, threshold: float | None, dim: int, arithmetic: Arithmetic,
    unit: np.ndarray | None = None,
) -> None:  # fmt: skip
    tau = _limits(found.best.min(1), bounds, threshold, dim, arithmetic, unit)
    screened = ~found.left
    found.tau[screened] = np.maximum(found.tau[screened], tau[screened])


def _limits(
    lower: np.ndarray, bounds: torch.Tensor, threshold: float | None, dim: int, arithmetic: Arithmetic,
    unit: np.ndarray | None = None,
) -> np.ndarray:  # fmt: skip
    """bits(τ) per row from a lower bound (bits) of its k-th largest p: from the limit L on
    s̃ - h(p̃) given the k-th s̃ + h(p̃) (`knn_bounds`, item 4; h = 0 for a float32 output), the
    smallest p̃ with p̃ + h(p̃) ≥ 1 - L less the slack (module docstring). Not positive where no
    limit holds. The int8 screen (`unit`: fl(c·d) per row): integers P, p = fl(P·unit)."""
    known = lower > 0  # a negative or absent p_k: no usable limit
    p_k = np.where(known, lower, 0)
    if unit is not None:
        p_k = torch.from_numpy(p_k * unit)  # the float64 product the values are (`_collected`)
    else:
        p_k = torch.from_numpy(p_k).view(output_dtype(arithmetic)).double()
    p_k = p_k - output_error(p_k, arithmetic)  # the k-th s̃ + h(p̃) is 1 - this
    scores = torch.where(torch.from_numpy(known), 1.0 - p_k, math.inf)[:, None]
    limit = screened_enough(scores, 1, bounds, threshold, "cosine", dim)[1]
    tau = ((1.0 - limit) - _SLACK * (1.0 + limit.abs())).numpy()
    if unit is not None:
        return _integer_reaching(tau, unit)
    if arithmetic.output_unit == 0.0:
        return _round_down_bits(tau, output_dtype(arithmetic))
    return _reaching_bits(tau, arithmetic)


def _integer_reaching(tau: np.ndarray, unit: np.ndarray) -> np.ndarray:
    """The smallest integer P ≥ 1 with fl(P·unit) ≥ tau per row (int32), where tau > 0, else 0;
    the int32 maximum where tau/unit ≥ 2³¹ (no product reaches it).

    fl(P·unit) grows with P, and it errs by 2⁻⁵³ relative: for tau/unit < 2³¹ that answer lies
    within ⌊fl(tau/unit)⌋ - 1 and three past it, which are tried upwards."""
    valid = np.isfinite(tau) & (tau > 0)
    tau = np.where(valid, tau, 1.0)
    ratio = tau / unit
    beyond = ratio >= 2.0**31
    integer = np.maximum(np.floor(np.where(beyond, 0.0, ratio)) - 1, 1.0)
    for _ in range(5):
        integer += integer * unit < tau
    integer = np.where(beyond, np.iinfo(np.int32).max, integer)
    return np.where(valid, integer, 0).astype(np.int32)


def _reaching_bits(tau: np.ndarray, arithmetic: Arithmetic) -> np.ndarray:
    """Bits of the smallest non-negative number p̃ of the output type with p̃ + h(p̃) ≥ tau, where
    tau > 0, else 0. p̃ + h(p̃) grows with p̃ (`knn_bounds`, item 4), and h is at most half the
    spacing below and above p̃: so it is the largest number y ≤ tau if y + h(y) reaches tau, else
    the next one (the one before y reaches less than y ≤ tau)."""
    below = _round_down_bits(tau, arithmetic.dtype)  # y; 0 where tau ≤ 0
    values = torch.from_numpy(below).view(arithmetic.dtype).double()
    reaches = (values + output_error(values, arithmetic)).numpy() >= tau
    bits = np.where(reaches, below, below + 1)
    return np.where(np.isnan(tau) | (tau <= 0), 0, bits).astype(np.int16)


def _round_down_bits(tau: np.ndarray, out_dtype: torch.dtype) -> np.ndarray:
    """Bits of the largest `out_dtype` number ≤ tau where tau > 0, else 0 (or less)."""
    tau = np.where(np.isnan(tau) | (tau <= 0), 0.0, tau)
    single = tau.astype(np.float32)
    single = np.where(single > tau, np.nextafter(single, np.float32(-np.inf)), single).astype(np.float32)
    if out_dtype == torch.float32:
        return single.view(np.int32)
    if out_dtype == torch.bfloat16:  # dropping the low half of a positive float32 rounds down
        return (single.view(np.uint32) >> 16).astype(np.int16)
    half = single.astype(np.float16)
    half = np.where(half > single, np.nextafter(half, np.float16(-np.inf)), half).astype(np.float16)
    return half.view(np.int16)


def _collected(
    found: _Candidates, n_rows: int, out_dtype: torch.dtype, unit: np.ndarray | None = None
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The candidates of the rows screened here, padded per row, in the top-m screen's form
    (the int8 screen's values P·fl(c·d) with `unit` fl(c·d) per row, as `screen.int8_product`)."""
    kept_rows = np.flatnonzero(~found.left)
    if found.rows:
        rows, columns, bits = (np.concatenate(parts) for parts in (found.rows, found.columns, found.bits))
    else:
        rows = columns = np.zeros(0, dtype=np.int64)
        bits = np.zeros(0, dtype=found.integer)
    position = np.full(n_rows, -1, dtype=np.int64)
    position[kept_rows] = np.arange(len(kept_rows))
    # a candidate below the final τ is above the final limit L: _settle would not refine it
    kept = found.tau[rows] <= bits
    original, rows = rows, position[rows]
    order = np.argsort(rows, kind="stable")
    order = order[(rows >= 0)[order] & kept[order]]
    rows, columns, bits = rows[order], columns[order], bits[order]
    counts = np.bincount(rows, minlength=len(kept_rows))
    starts = np.cumsum(counts) - counts
    rank = np.arange(len(rows)) - starts[rows]
    width = int(counts.max(initial=0)) + 1  # + 1: the +inf column (module docstring)
    values = torch.full((len(kept_rows), width), math.inf, dtype=torch.float64)
    indices = torch.full((len(kept_rows), width), -1, dtype=torch.int64)
    where = (torch.from_numpy(rows), torch.from_numpy(rank))
    if unit is not None:
        values[where] = -torch.from_numpy(bits * unit[original[order]])
    else:
        values[where] = -torch.from_numpy(bits).view(out_dtype).double()
    indices[where] = torch.from_numpy(columns)
    return values, indices, kept_rows
