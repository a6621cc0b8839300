"""Per-aspect exact k-NN (goPredSim's search per ontology): for each GO aspect, the k nearest
references that carry at least one annotation in that aspect, from one screen of the matrix.

`transfer.aspect_masks` says which reference rows serve which aspect (three boolean masks over the rows);
`search_by_aspect` answers every mask at once with a built `knn.SearchEngine`. Each block of the
screening product is computed once. Its columns are split by *pattern* (the set of masks a
reference is in: P only, P and F, …; a reference in no mask is skipped), each pattern's columns
are reduced to their top-m once, and each mask merges the candidates of the patterns it contains
into its running top-m. A mask's m smallest values lie among the m smallest of each of its
patterns, so this is exact, and the selection, the screen's costliest step, reads every column
once however many masks share it (against once per mask for a selection per mask).
Sufficiency, refinement in float64 and selection are the engine's, per mask: the answer for a mask
is exactly the engine's answer with every reference outside the mask excluded, with the same
distances, (distance, index) ties, threshold and tie expansion (the tests compare both, and a
float64 brute-force oracle). A row whose screen cannot yet prove its answer for some aspect is
screened again, with a wider window, for those aspects only, as the engine does. It drives the
engine's own steps (`_prepare_queries`, `_block_values`, `_settle`), so both
searches share one arithmetic and one error bound.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from . import knn, screen
from .knn_inputs import Exclusions, assemble_rows, exclusions_for_rows, search_arguments


def search_by_aspect(
    engine: knn.SearchEngine,
    masks: np.ndarray,
    queries: np.ndarray,
    k: int,
    threshold: float | None = None,
    exclude: tuple[np.ndarray, np.ndarray] | None = None,
    tie_expansion: bool = False,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`engine.search` restricted to each mask's references, for every mask, in one screen.

    Args:
        engine: a built engine; `masks` (n_masks, n_ref) bool selects each mask's reference rows.
        queries, k, threshold, exclude, tie_expansion: as `SearchEngine.search`.

    Returns:
        one (distances float32 (n_q, K), indices int64 (n_q, K)) per mask, as `SearchEngine.search`
        returns them; a mask without references gives rows of +inf and -1.
    """
    n_references, dim = engine.n_references, engine.dim  # the public properties: RuntimeError before build
    masks = np.asarray(masks)
    if masks.dtype != bool or masks.ndim != 2 or masks.shape[1] != n_references:
        raise ValueError(f"masks must be boolean (n_masks, {n_references}), got {masks.dtype} {masks.shape}")
    n_queries, k, indptr, excluded, q32, q_sq_norms = search_arguments(
        queries, k, threshold, exclude, n_references, dim, engine.metric
    )
    patterns = _patterns(masks)
    query_block = engine._block_shape(n_queries)[0]
    parts: list[list] = [[] for _ in masks]
    with screen.exact_matmul_settings():
        for start in range(0, n_queries, query_block):
            block = slice(start, min(start + query_block, n_queries))
            pointers = indptr[block.start : block.stop + 1]
            rows = np.repeat(np.arange(len(pointers) - 1), np.diff(pointers))
            exclusions = (rows, excluded[pointers[0] : pointers[-1]])
            found = _search_query_block(
                engine,
                masks.sum(1),
                patterns,
                q32[block],
                q_sq_norms[block],
                exclusions,
                k,
                threshold,
                tie_expansion,
            )
            for a, (distances, indices) in enumerate(found):
                parts[a].append((np.arange(block.start, block.stop), distances, indices))
    return [assemble_rows(n_queries, k, mask_parts) for mask_parts in parts]


def _patterns(masks: np.ndarray) -> list[tuple[np.ndarray, list[int]]]:
    """(columns, masks containing them) per pattern of mask membership; columns ascending."""
    bits = (masks.astype(np.int64) << np.arange(len(masks))[:, None]).sum(0)
    found = []
    for pattern in np.unique(bits[bits > 0]).tolist():
        found.append((np.flatnonzero(bits == pattern), [a for a in range(len(masks)) if pattern >> a & 1]))
    return found


def _search_query_block(
    engine: knn.SearchEngine,
    sizes: np.ndarray,
    patterns: list[tuple[np.ndarray, list[int]]],
    q32: np.ndarray,
    q_sq_norms: np.ndarray,
    exclusions: Exclusions,
    k: int,
    threshold: float | None,
    tie_expansion: bool,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """`SearchEngine._search_query_block` for every mask, each round screening the rows still
    pending in some mask once."""
    n_rows, device = len(q32), engine.device
    fast_queries, offsets, exact_queries, bounds = engine._prepare_queries(q32, q_sq_norms)
    bounds = torch.from_numpy(bounds).to(device)
    offsets = torch.from_numpy(offsets).to(device)
    margin = knn._SCREEN_MARGIN["half" if engine.arithmetic.half else "fp32"]
    sizes = sizes.tolist()
    pending = [np.arange(n_rows) if size else np.zeros(0, dtype=np.int64) for size in sizes]
    widths = [min(k + margin, size) for size in sizes]
    parts: list[list] = [[] for _ in sizes]
    while any(p.size for p in pending):
        union = np.unique(np.concatenate(pending))
        union_exclusions = exclusions_for_rows(exclusions, union, n_rows)
        positions = [np.searchsorted(union, p) for p in pending]
        screened = _screen(engine, fast_queries[union], union_exclusions, patterns, positions, widths)
        for a, (values, indices) in enumerate(screened):
            if not pending[a].size:
                continue
            done, selected = engine._settle(
                values, indices, pending[a], offsets, bounds, exact_queries,
                k, threshold, tie_expansion, complete=widths[a] >= sizes[a],
            )  # fmt: skip
            parts[a].append((pending[a][done], *selected))
            pending[a] = np.delete(pending[a], done)
            widths[a] = min(widths[a] * knn._MARGIN_GROWTH, sizes[a])
    return [assemble_rows(n_rows, k, mask_parts) for mask_parts in parts]


def _screen(
    engine: knn.SearchEngine,
    fast_queries: np.ndarray | torch.Tensor,
    exclusions: Exclusions,
    patterns: list[tuple[np.ndarray, list[int]]],
    positions: list[np.ndarray],
    widths: list[int],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per mask a, the `widths[a]` smallest block values of the rows `positions[a]` (of
    `fast_queries`) among the mask's references, from one pass over the reference blocks
    (module docstring: each pattern's columns are selected once, then merged per mask).

    Returns per mask (values float64 (len(positions[a]), width), indices int64) on the device,
    unordered; excluded references and padding have value +inf (padding has index -1).
    """
    n_rows, device = len(fast_queries), engine.device
    # a pattern's columns are copied beside the block: half the engine's block keeps to the budget
    reference_block = max(1, engine._block_shape(n_rows)[1] // 2)
    torch_backend = engine.backend == "torch"
    xp = torch if torch_backend else np
    buffers = []
    if torch_backend:
        buffers = engine._product_buffers(n_rows * reference_block)
        excluded_rows, excluded_cols = (torch.from_numpy(pairs).to(device) for pairs in exclusions)
    else:
        excluded_rows, excluded_cols = exclusions
    best = []
    for a, rows in enumerate(positions):
        shape = (len(rows), widths[a])
        if torch_backend:
            best.append(
                (
                    torch.full(shape, math.inf, dtype=screen.value_dtype(engine.arithmetic), device=device),
                    torch.full(shape, -1, dtype=torch.int64, device=device),
                )
            )
        else:
            best.append((np.full(shape, np.inf), np.full(shape, -1, dtype=np.int64)))
    all_rows = [len(rows) == n_rows for rows in positions]  # rows in order: no row selection needed
    row_index = [torch.from_numpy(rows).to(device) if torch_backend else rows for rows in positions]
    for start in range(0, engine.n_references, reference_block):
        stop = min(start + reference_block, engine.n_references)
        values = engine._block_values(fast_queries, start, stop, buffers)
        if len(excluded_cols):
            in_block = (excluded_cols >= start) & (excluded_cols < stop)
            values[excluded_rows[in_block], excluded_cols[in_block] - start] = math.inf
        found: list[list] = [[] for _ in positions]  # per mask: its patterns' candidates in this block
        for pattern_columns, members in patterns:
            wanted = [a for a in members if len(positions[a])]
            lo, hi = np.searchsorted(pattern_columns, (start, stop))
            if lo == hi or not wanted:
                continue
            block_columns = pattern_columns[lo:hi] - start
            width = max(widths[a] for a in wanted)
            if torch_backend:
                block_columns = torch.from_numpy(block_columns).to(device)
                candidates = values.index_select(1, block_columns)
                if width < len(block_columns):  # else every column is a candidate
                    scratch = engine._buffer("minima", candidates.numel() // 2, candidates.dtype)
                    chosen = screen.smallest_columns(candidates, width, scratch)
                    candidates, block_columns = screen.take(candidates, chosen), block_columns[chosen]
                candidates = candidates.to(screen.value_dtype(engine.arithmetic))  # 16-bit: exactly
            else:
                candidates = values[:, block_columns]
                if width < len(block_columns):
                    chosen = screen.smallest_positions(candidates, width)
                    candidates, block_columns = screen.take(candidates, chosen), block_columns[chosen]
            indices = xp.broadcast_to(block_columns + start, candidates.shape)
            for a in wanted:
                if all_rows[a]:
                    found[a].append((candidates, indices))
                else:
                    found[a].append((candidates[row_index[a]], indices[row_index[a]]))
        for a, pairs in enumerate(found):
            if not pairs:
                continue
            merged_values = xp.concatenate([best[a][0], *(v for v, _ in pairs)], axis=1)
            merged_indices = xp.concatenate([best[a][1], *(i for _, i in pairs)], axis=1)
            keep = screen.smallest_positions(merged_values, widths[a])
            best[a] = (screen.take(merged_values, keep), screen.take(merged_indices, keep))
    if torch_backend:
        return [(values.double(), indices) for values, indices in best]
    return [tuple(torch.from_numpy(part).to(device) for part in pair) for pair in best]
