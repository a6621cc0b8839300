"""Alignment metrics of query/reference sequence pairs (SPEC §3.8), exactly as FANTASIA counts them.

For each pair, a global (Needleman–Wunsch) and a local (Smith–Waterman) alignment with BLOSUM62,
gap open 10 and gap extend 1 in parasail's convention (a gap of k columns costs 10 + (k − 1)).
With L = alignment length in columns, gap columns included:

    identity        = columns with identical residues ('|') / L
    similarity      = columns with identical or positive-scoring residues ('|' or ':') / L
    gaps_percentage = gap columns (' ') / L          a fraction, despite the name
    alignment_score = the alignment's score
    alignment_length = L

Local metrics carry the suffix ``_sw``. All values are float64, as in FANTASIA.

Conventions where FANTASIA's parasail calls have no answer:

* Sequences are normalised first by the rule of `core.sequences` (whitespace, digits and the
  gaps ``-``/``.`` removed, letters upper-cased); letters A–Z and ``*`` are accepted (BLOSUM62
  scores J, O, U like ``*``), anything else raises `ValueError` naming the sequence and the
  character, unless `alignment_metrics` is asked to leave such pairs' metrics empty.
* An alignment of length 0 has identity, similarity and gaps 0.0 (FANTASIA's own rule). That is
  the local alignment when no residue pair scores positive, and then its score is 0 (the
  Smith–Waterman definition; parasail's striped 32-bit kernel reports INT32_MIN/2 instead).
* An empty sequence (parasail refuses it): the global alignment is the other sequence against
  one gap, score −(10 + (n − 1)) and gaps 1.0; both empty, or any local one, is length 0.

Why traceback kernels and not parasail's ``*_stats_*`` ones: on real Swiss-Prot pairs the
``scan`` traceback kernels (16-bit, query profile reused) run about twice as fast as the stats
kernels of any layout or width, and the stats cannot give the same numbers anyway: their global
``length`` leaves out leading end gaps, their ``matches`` compare matrix rows (U and O match,
as both score like ``*``) where the traceback compares letters, their ``similar`` misses
X–X columns (score −1 but identical), and a local alignment's gap count needs its start, which
only the traceback knows. Every parasail traceback kernel (striped, scan, diag; 8, 16, 32 bits)
follows the same rules to choose among co-optimal alignments — diagonal before deletion before
insertion, gap extension before opening, the end with the smallest reference then query
position, a local alignment starting after its last zero cell — so the fast path reproduces
FANTASIA's ``nw_trace_striped_32`` / ``sw_trace_striped_32`` column for column; the tests and
``bench/alignment.py`` check this on real pairs.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import parasail
import polars as pl

from . import sequences as sequence_rule

GAP_OPEN = 10
GAP_EXTEND = 1
METRIC_COLUMNS = (
    "identity",
    "similarity",
    "alignment_score",
    "gaps_percentage",
    "alignment_length",
    "identity_sw",
    "similarity_sw",
    "alignment_score_sw",
    "gaps_percentage_sw",
    "alignment_length_sw",
)
# A traceback table holds one cell per residue pair: 2 bytes at 16 bits, 4 at 32. Titin against
# its ortholog is 35k × 35k cells, gigabytes, so worker threads share this budget.
DEFAULT_TRACE_MEMORY_BYTES = 4 << 30

_MATRIX = parasail.blosum62
# Pairs per worker task: one query profile serves them all, and tasks stay small enough to
# balance the threads when a few pairs are much longer than the rest.
_PAIRS_PER_TASK = 16
_PROFILE_CREATORS = {16: parasail.profile_create_16, 32: parasail.profile_create_32}
_GLOBAL_KERNELS = {16: parasail.nw_trace_scan_profile_16, 32: parasail.nw_trace_scan_profile_32}
_LOCAL_KERNELS = {16: parasail.sw_trace_scan_profile_16, 32: parasail.sw_trace_scan_profile_32}
# Counts of one alignment: score, identical columns, positive-scoring non-identical columns,
# gap columns, length.
_Counts = tuple[int, int, int, int, int]


def traceback_metrics(query: str, reference: str) -> dict[str, float]:
    """The ten metrics of one pair, computed as FANTASIA does (the reference for `alignment_metrics`).

    One ``nw_trace_striped_32`` and one ``sw_trace_striped_32`` alignment, whose traceback
    comparison strings are counted. Raises `ValueError` for characters other than letters and '*'.
    """
    query_bytes = _normalise(query, "query")
    reference_bytes = _normalise(reference, "reference")
    if query_bytes and reference_bytes:
        global_counts = _traceback_counts(
            parasail.nw_trace_striped_32(query_bytes, reference_bytes, GAP_OPEN, GAP_EXTEND, _MATRIX)
        )
        local_counts = _traceback_counts(
            parasail.sw_trace_striped_32(query_bytes, reference_bytes, GAP_OPEN, GAP_EXTEND, _MATRIX)
        )
    else:
        global_counts, local_counts = _empty_pair_counts(len(query_bytes) + len(reference_bytes))
    metrics: dict[str, float] = {}
    for suffix, (score, identical, positive, gaps, length) in (("", global_counts), ("_sw", local_counts)):
        metrics["identity" + suffix] = identical / length if length else 0.0
        metrics["similarity" + suffix] = (identical + positive) / length if length else 0.0
        metrics["alignment_score" + suffix] = float(score)
        metrics["gaps_percentage" + suffix] = gaps / length if length else 0.0
        metrics["alignment_length" + suffix] = float(length)
    return metrics


def alignment_metrics(
    queries: Sequence[str],
    references: Sequence[str],
    workers: int | None = None,
    trace_memory_bytes: int = DEFAULT_TRACE_MEMORY_BYTES,
    skip_unusable: bool = False,
) -> pl.DataFrame:
    """Metrics of every (queries[i], references[i]) pair: one row per pair, in input order.

    Identical numbers to `traceback_metrics`, computed with parasail's 16-bit ``scan`` traceback
    kernels (32-bit when a score does not fit), one query profile per task, each distinct pair
    aligned once, on `workers` threads (default: all CPUs; ctypes releases the GIL in parasail). Worker
    threads together hold at most `trace_memory_bytes` of traceback tables; a pair needing more
    runs alone. Columns: `METRIC_COLUMNS`, all float64.

    With `skip_unusable`, a pair whose query or reference breaks the sequence rule (empty
    included) is not aligned and gets null in every column, instead of raising `ValueError`:
    the caller names it to the user.
    """
    if len(queries) != len(references):
        raise ValueError(f"{len(queries)} queries but {len(references)} references: pairs need one of each")
    workers = (os.cpu_count() or 1) if workers is None else workers
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    slots: dict[tuple[bytes, bytes], int] = {}
    pair_slot = np.empty(len(queries), dtype=np.int64)
    skipped = np.zeros(len(queries), dtype=bool)
    for i, (query, reference) in enumerate(zip(queries, references)):
        if skip_unusable and not (_usable(query) and _usable(reference)):
            skipped[i], pair_slot[i] = True, 0
            continue
        key = (_normalise(query, f"queries[{i}]"), _normalise(reference, f"references[{i}]"))
        pair_slot[i] = slots.setdefault(key, len(slots))
    unique_pairs = list(slots)
    # counts[slot] = global then local _Counts
    counts = np.zeros((len(unique_pairs), 10), dtype=np.int64)
    tasks = _tasks(unique_pairs)
    memory = _TraceMemory(trace_memory_bytes)

    def run(task: tuple[bytes, list[int]]) -> None:
        query, task_slots = task
        _align_task(query, [unique_pairs[s][1] for s in task_slots], counts, task_slots, memory)

    if workers == 1 or len(tasks) <= 1:
        for task in tasks:
            run(task)
    else:
        with ThreadPoolExecutor(max_workers=min(workers, len(tasks))) as pool:
            for _ in pool.map(run, tasks):
                pass
    frame = _metrics_frame(counts[pair_slot] if len(unique_pairs) else np.zeros((len(queries), 10), np.int64))
    if skipped.any():
        keep = pl.Series(~skipped)
        frame = frame.select(pl.when(keep).then(pl.col(c)).alias(c) for c in METRIC_COLUMNS)
    return frame


def _usable(sequence: object) -> bool:
    return isinstance(sequence, str) and sequence_rule.usable(sequence_rule.clean(sequence))


def _normalise(sequence: str | None, name: str) -> bytes:
    """The sequence under the rule of `core.sequences`, as ASCII bytes (what parasail reads).

    Empty is allowed here (see the module docstring); other breaches raise `ValueError` naming it.
    """
    if not isinstance(sequence, str):
        raise ValueError(f"{name} is {type(sequence).__name__}, expected a sequence string")
    cleaned = sequence_rule.clean(sequence)
    reason = sequence_rule.problem(cleaned) if cleaned else None
    if reason is not None:
        raise ValueError(f"{name}: {reason}")
    return cleaned.encode("ascii")


def _traceback_counts(result: parasail.Result) -> _Counts:
    """Counts of a traceback kernel's result, from its comparison string ('|', ':', '.', ' ')."""
    comparison = result.get_traceback().comp
    # An empty local alignment scores 0 whatever sentinel the kernel left in `score`.
    score = result.score if comparison else 0
    return (score, comparison.count("|"), comparison.count(":"), comparison.count(" "), len(comparison))


def _empty_pair_counts(residues: int) -> tuple[_Counts, _Counts]:
    """Global and local counts when a sequence is empty and the other has `residues`."""
    empty: _Counts = (0, 0, 0, 0, 0)
    if residues == 0:
        return empty, empty
    return (-(GAP_OPEN + (residues - 1) * GAP_EXTEND), 0, 0, residues, residues), empty


def _tasks(unique_pairs: list[tuple[bytes, bytes]]) -> list[tuple[bytes, list[int]]]:
    """Slots grouped by query in chunks of `_PAIRS_PER_TASK`, costliest (most cells) first."""
    by_query: dict[bytes, list[int]] = {}
    for slot, (query, _) in enumerate(unique_pairs):
        by_query.setdefault(query, []).append(slot)
    tasks = [
        (query, slots[start : start + _PAIRS_PER_TASK])
        for query, slots in by_query.items()
        for start in range(0, len(slots), _PAIRS_PER_TASK)
    ]
    # Longest first, so no long task is left to run alone at the end.
    tasks.sort(key=lambda t: -len(t[0]) * sum(len(unique_pairs[s][1]) for s in t[1]))
    return tasks


def _align_task(
    query: bytes, references: list[bytes], counts: np.ndarray, slots: list[int], memory: _TraceMemory
) -> None:
    """Align one query against `references`, writing counts[slots[k]] for each reference k."""
    profiles: dict[int, parasail.Profile] = {}
    for slot, reference in zip(slots, references):
        if query and reference:
            global_counts = _scan_counts(_GLOBAL_KERNELS, query, reference, profiles, memory)
            local_counts = _scan_counts(_LOCAL_KERNELS, query, reference, profiles, memory)
        else:
            global_counts, local_counts = _empty_pair_counts(len(query) + len(reference))
        counts[slot] = global_counts + local_counts


def _scan_counts(
    kernels: dict[int, Callable[..., parasail.Result]],
    query: bytes,
    reference: bytes,
    profiles: dict[int, parasail.Profile],
    memory: _TraceMemory,
) -> _Counts:
    """Counts from the 16-bit kernel, or from the 32-bit one when 16-bit scores saturate."""
    for bits, kernel in kernels.items():
        if bits not in profiles:
            profiles[bits] = _PROFILE_CREATORS[bits](query, _MATRIX)
        counts = _kernel_counts(
            kernel, profiles[bits], reference, memory, len(query) * len(reference) * bits // 8
        )
        if counts is not None:
            return counts
    raise OverflowError(
        f"alignment scores exceed {max(kernels)} bits ({len(query)} × {len(reference)} residues)"
    )


def _kernel_counts(
    kernel: Callable[..., parasail.Result],
    profile: parasail.Profile,
    reference: bytes,
    memory: _TraceMemory,
    table_bytes: int,
) -> _Counts | None:
    """Counts of one kernel run, or None when its scores saturated."""
    with memory.hold(table_bytes):
        result = kernel(profile, reference, GAP_OPEN, GAP_EXTEND)
        counts = None if result.saturated else _traceback_counts(result)
        del result  # frees the table while its bytes are still counted
    return counts


def _fraction(numerator: np.ndarray, length: np.ndarray) -> np.ndarray:
    """numerator / length, 0.0 where length is 0.

    IEEE division of integers held exactly in float64, so bit-identical to Python's int / int.
    """
    return np.divide(numerator, length, out=np.zeros_like(numerator), where=length > 0)


def _metrics_frame(counts: np.ndarray) -> pl.DataFrame:
    """Metric columns from per-pair counts (n, 10): global then local score, |, :, gaps, length."""
    columns: dict[str, np.ndarray] = {}
    for offset, suffix in ((0, ""), (5, "_sw")):
        score, identical, positive, gaps, length = (
            counts[:, offset + k].astype(np.float64) for k in range(5)
        )
        columns["identity" + suffix] = _fraction(identical, length)
        columns["similarity" + suffix] = _fraction(identical + positive, length)
        columns["alignment_score" + suffix] = score
        columns["gaps_percentage" + suffix] = _fraction(gaps, length)
        columns["alignment_length" + suffix] = length
    return pl.DataFrame(
        {name: columns[name] for name in METRIC_COLUMNS}, schema={name: pl.Float64 for name in METRIC_COLUMNS}
    )


class _TraceMemory:
    """Bytes of traceback tables the worker threads may hold at once; an oversized one runs alone."""

    def __init__(self, budget: int) -> None:
        self._budget = budget
        self._in_use = 0
        self._changed = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        with self._changed:
            while self._in_use and self._in_use + nbytes > self._budget:
                self._changed.wait()
            self._in_use += nbytes
        try:
            yield
        finally:
            with self._changed:
                self._in_use -= nbytes
                self._changed.notify_all()
