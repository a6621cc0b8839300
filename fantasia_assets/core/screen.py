"""Screening arithmetic of the k-NN engine: which precision screens, and its fast kernels.

The engine's screen (see `knn`) is a matrix product whose rounding `knn_bounds` bounds. It runs in
float32 everywhere, or in a 16-bit type on matrix units that run it several times faster:

* CPU: bfloat16 through oneDNN when the CPU has AMX-BF16 or AVX512-BF16 (``/proc/cpuinfo``)
  and a start-up probe measures torch's bfloat16 product at least `_PROBE_MIN_SPEEDUP` × faster
  than float32 on this machine (a loaded or throttled machine can lose the advantage). Products
  accumulate in float32 and the result is rounded once to bfloat16 (torch has no float32 output
  for bfloat16 operands on the CPU).
* CUDA: tensor cores, bfloat16 on cards that have it (compute capability ≥ 8.0), float16 on
  Volta/Turing (7.x) for cosine (unit vectors stay inside float16's range; euclidean vectors
  need not, so those cards screen euclidean in float32). Results stay float32 where torch offers
  ``out_dtype``; reduced-precision split-K reductions are switched off while screening.
* Elsewhere, and for the numpy and scipy backends: float32.
* int8 (torch's cosine screen on the CPU, whose int8 product sums exactly: `units`): 8-bit
  integers scaled by float32 factors (`ScaledRows`): each query row by its own c, so that its
  largest component is about 127, and every reference row by one shared d, the largest
  reference component's over 127 (`shared_int8_factor`). The integer products accumulate
  exactly in int32 (n·127² < 2³¹ up to `INT8_MAX_DIM` dimensions), and the score is P·fl(c·d),
  whose factor is exact in float64: one float64 rounding, 2⁻⁵³ relative, which the accumulation
  term γ_{n+2}(2⁻⁵³) of `knn_bounds` covers. One reference factor makes a query's scores
  monotone in P, so that the admission screen selects on the integers themselves
  (`knn_admission`); it costs the bound nothing, which takes the largest reference residual
  (the row of largest components had it with factors per row too), though the other rows round
  coarser than their own factor would round them. Products of VNNI/AMX-INT8 units run about
  twice the bfloat16 rate, but the operands round coarser (the bound is four to five times
  bfloat16's on unit vectors), so the window is wider and refinement has more candidates: on
  separated neighbourhoods that costs little, on dense ones (real 256-d embeddings whose
  candidates already number hundreds in bfloat16) more than it saves. ``"auto"`` takes it
  where an estimate from a sample of the references says it is faster (`knn_choice`).

``screening="bf16"`` pins the 16-bit screen (an error where no matrix unit runs it), ``"fp32"``
pins float32, ``"int8"`` the integer screen, ``"auto"`` chooses as above. Results are identical
either way; only speed changes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from fantasia_assets.errors import FantasiaError

from .units import CPU_FLAGS, INT8_LEVELS, bf16_beats_float32, cpu_has_bf16_units, int8_mm, int8_sums_exactly

SCREENINGS = ("auto", "bf16", "int8", "fp32")
_GROUP = 32  # columns per group of the two-stage selection (`smallest_columns`)
_CONVERT_ROWS = 4096  # rows converted per chunk: bounds the float64 temporaries
# ‖r̂‖ ≤ 1 + 2u + u² for a cosine unit reference r̂ = fl(r · fl(1/‖r‖)) (`knn_bounds`, item 1),
# u = 2⁻²⁴; 1 + 2.1u leaves room for the float64 norm and its reciprocal
UNIT_ROW_NORM = 1.0 + 2.1 * 2.0**-24


class ScreeningError(FantasiaError, ValueError):
    """The pinned screening cannot run here (backend, card or CPU); the message says why."""


@dataclass(frozen=True)
class Arithmetic:
    """How a screen's matrix product rounds, as unit roundoffs (0: that step is exact).

    Attributes:
        name: "fp32", "bf16" or "fp16".
        dtype: operand type of the product (float32 for the float32 screen).
        accumulation_unit: of the kernel's sums (and products, for float32 operands).
        output_unit: of the rounding of each result to the output type.
        smallest_normal: operands below it in magnitude are zeroed before the product, so that a
            kernel that flushes subnormals computes exactly what the bound accounts for.
    """

    name: str
    dtype: torch.dtype
    accumulation_unit: float
    output_unit: float
    smallest_normal: float

    @property
    def half(self) -> bool:
        return self.dtype != torch.float32


FP32 = Arithmetic("fp32", torch.float32, 2.0**-24, 0.0, 0.0)
# 16-bit operands: their products are exact in float32 (8 + 8 or 11 + 11 significant bits), so
# only the float32 sums round. Tensor cores align and truncate instead of rounding to nearest
# (Fasi, Higham, Mikaitis & Pranesh, PeerJ CS 2021), so the bound takes 2⁻²², four float32 units.
_HALF_ACCUMULATION = 2.0**-22
_SMALLEST_NORMAL = {torch.bfloat16: 2.0**-126, torch.float16: 2.0**-14}
_OUTPUT_UNIT = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}
# 8-bit operands (module docstring): exact int32 sums, then one float64 rounding of P·fl(c·d)
INT8 = Arithmetic("int8", torch.int8, 2.0**-53, 0.0, 0.0)
INT8_MAX_DIM = (2**31 - 1) // INT8_LEVELS**2


@dataclass(frozen=True)
class ScaledRows:
    """An int8 screen's operands: rows `values` (b, n) int8 standing for values·scale[:, None],
    `scale` (b,) float32 per row (module docstring). Indexed and negated like a tensor."""

    values: torch.Tensor
    scale: torch.Tensor

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, rows) -> ScaledRows:
        return ScaledRows(self.values[rows], self.scale[rows])

    def neg(self) -> ScaledRows:
        return ScaledRows(self.values.neg(), self.scale)  # exact: |values| ≤ 127


def resolve_screening(requested: str, backend: str, device: torch.device, metric: str) -> Arithmetic:
    """The arithmetic a search screens in (module docstring); ScreeningError for an impossible pin."""
    if requested not in SCREENINGS:
        raise ValueError(f"unknown screening {requested!r}; expected one of {SCREENINGS}")
    if requested == "fp32":
        return FP32
    if requested == "int8":
        if not (backend == "torch" and device.type == "cpu" and metric == "cosine"):
            raise ScreeningError(
                f"lookup.screening 'int8' runs torch's cosine screen on the CPU only, "
                f"not backend {backend!r} on {device.type} with {metric!r}"
                + (" (set lookup.use_gpu: false)" if device.type == "cuda" else "")
            )
        if not int8_sums_exactly():
            raise ScreeningError("lookup.screening 'int8': this CPU's int8 product does not sum exactly")
        return INT8
    if backend != "torch":
        if requested == "bf16":
            raise ScreeningError(f"lookup.screening 'bf16' needs lookup.backend 'torch', not {backend!r}")
        return FP32
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        dtype = torch.bfloat16 if major >= 8 else torch.float16 if major == 7 and metric == "cosine" else None
        if dtype is None:
            if requested == "bf16":
                raise ScreeningError(
                    f"lookup.screening 'bf16': this card (compute capability {major}.x) has no 16-bit "
                    f"tensor cores for the {metric} screen"
                )
            return FP32
        output_unit = 0.0 if _float32_output_available(device, dtype) else _OUTPUT_UNIT[dtype]
        return Arithmetic(_NAMES[dtype], dtype, _HALF_ACCUMULATION, output_unit, _SMALLEST_NORMAL[dtype])
    if not cpu_has_bf16_units():
        if requested == "bf16":
            raise ScreeningError(
                f"lookup.screening 'bf16': this CPU has none of {CPU_FLAGS} (see /proc/cpuinfo)"
            )
        return FP32
    if requested == "auto" and not bf16_beats_float32():
        return FP32
    dtype = torch.bfloat16
    return Arithmetic(_NAMES[dtype], dtype, _HALF_ACCUMULATION, _OUTPUT_UNIT[dtype], _SMALLEST_NORMAL[dtype])


def _float32_output_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether torch can return the 16-bit product in float32 on `device` (``out_dtype``)."""
    operand = torch.ones(2, 2, dtype=dtype, device=device)
    try:
        torch.mm(operand, operand, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def to_operands(
    matrix: torch.Tensor,
    arithmetic: Arithmetic,
    centre: torch.Tensor | None = None,
    unit_rows: bool = False,
    int8_factor: float | None = None,
) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """`matrix` (float32, less `centre` if given) as the screen's operands, and per-row float64
    norms for the bound: "norm" of the float32 row, "operand_norm", "residual" ‖row - operand‖.

    Operands below the type's smallest normal are zeroed; the residual norms account for every
    change the product will see. The residual row - operand is exact in float32: a nonzero
    operand is the row rounded to nearest, within a factor 2 of it (Sterbenz), and a zeroed one
    leaves the row itself. The float32 screen without a centre uses `matrix` itself.

    `unit_rows`: the rows are cosine's stored unit references r̂ (`knn_reference`), whose norms
    are at most `UNIT_ROW_NORM` (`knn_bounds`, item 1). The bound only needs upper bounds of
    its norms (every term grows with them), so only the residuals are measured: "norm" is
    `UNIT_ROW_NORM` and "operand_norm" ‖r̂‖ + ‖r̂ - operand‖ rounded up, which bounds ‖operand‖
    by the triangle inequality. Two of the three float64 passes over each row go, the costliest
    part of preparing a million references (measured: 2.8 of 8.9 s of CPU).
    `int8_factor`: the int8 screen's one factor for every row (the references'), else each
    row's own.
    """
    if arithmetic.dtype == torch.int8:
        return _int8_operands(matrix, unit_rows, int8_factor)
    if not arithmetic.half and centre is None:
        if unit_rows:
            bound = np.full(len(matrix), UNIT_ROW_NORM)
            return matrix, {"norm": bound, "operand_norm": bound, "residual": np.zeros(len(matrix))}
        norms = np.empty(len(matrix))
        for start in range(0, len(matrix), _CONVERT_ROWS):
            chunk = matrix[start : start + _CONVERT_ROWS]
            norms[start : start + len(chunk)] = row_norms(chunk)
        return matrix, {"norm": norms, "operand_norm": norms, "residual": np.zeros(len(matrix))}
    operands = torch.empty(matrix.shape, dtype=arithmetic.dtype, device=matrix.device)
    stats = {name: np.empty(len(matrix)) for name in ("norm", "operand_norm", "residual")}
    for start in range(0, len(matrix), _CONVERT_ROWS):
        rows = slice(start, start + _CONVERT_ROWS)
        chunk = matrix[rows] if centre is None else matrix[rows] - centre
        operand = chunk.to(arithmetic.dtype)
        # rounding is monotone and the smallest normal is representable: where no input is below
        # it in magnitude (zeros included), no operand is, and the 16-bit pass is skipped
        if chunk.numel() and float(chunk.abs().min()) < arithmetic.smallest_normal:
            operand.masked_fill_(operand.abs() < arithmetic.smallest_normal, 0)
        operands[rows] = operand
        wide = operand.float()  # exactly
        if not unit_rows:
            stats["norm"][rows] = row_norms(chunk)
            stats["operand_norm"][rows] = row_norms(wide)
        stats["residual"][rows] = row_norms(torch.sub(chunk, wide, out=wide))
    if unit_rows:
        stats["norm"][:] = UNIT_ROW_NORM
        stats["operand_norm"] = np.nextafter(UNIT_ROW_NORM + stats["residual"], np.inf)
    return operands, stats


def shared_int8_factor(largest: float) -> float:
    """The int8 screen's factor for rows whose largest component magnitude is `largest`:
    fl(largest / 127) in float32, 1 when that is 0 (zero rows stay zero with any factor)."""
    factor = float(np.float32(np.float32(largest) / np.float32(INT8_LEVELS)))
    return factor if factor > 0 else 1.0


def _int8_operands(
    matrix: torch.Tensor, unit_rows: bool, factor: float | None = None
) -> tuple[ScaledRows, dict[str, np.ndarray]]:
    """`to_operands` of the int8 screen: per row d = fl(max|row| / 127) (1 for a zero row), or
    the one `factor` given for every row, and values round(row / d) clamped to ±127. Whatever
    they are, the residual row - values·d is taken in float64, where values·d is exact (7 + 24
    significant bits) and so is the difference (the two agree to within d, their bits span under
    53 places); its norm bounds the change the product sees (`knn_bounds`, item 2), and
    ‖values·d‖ the operand's size."""
    values = torch.empty(matrix.shape, dtype=torch.int8, device=matrix.device)
    scale = torch.empty(len(matrix), dtype=torch.float32, device=matrix.device)
    stats = {name: np.empty(len(matrix)) for name in ("norm", "operand_norm", "residual")}
    for start in range(0, len(matrix), _CONVERT_ROWS):
        rows = slice(start, start + _CONVERT_ROWS)
        chunk = matrix[rows]
        if factor is not None:
            factors = chunk.new_full((len(chunk),), factor)
        else:
            largest = chunk.abs().amax(1) if chunk.shape[1] else chunk.new_zeros(len(chunk))
            factors = largest / INT8_LEVELS
            factors = torch.where(factors > 0, factors, 1.0)
        levels = torch.round(chunk / factors[:, None]).clamp_(-INT8_LEVELS, INT8_LEVELS)
        values[rows], scale[rows] = levels.to(torch.int8), factors
        operand = levels.double() * factors.double()[:, None]  # exactly
        stats["residual"][rows] = _float64_norms(chunk.double() - operand)
        if not unit_rows:
            stats["norm"][rows] = row_norms(chunk)
            stats["operand_norm"][rows] = _float64_norms(operand)
    if unit_rows:
        stats["norm"][:] = UNIT_ROW_NORM
        stats["operand_norm"] = np.nextafter(UNIT_ROW_NORM + stats["residual"], np.inf)
    return ScaledRows(values, scale), stats


def _float64_norms(rows: torch.Tensor) -> np.ndarray:
    return rows.square().sum(1).sqrt().cpu().numpy()


def int8_product(
    queries: ScaledRows, references: torch.Tensor, reference_scale: torch.Tensor, buffers: list[torch.Tensor]
) -> torch.Tensor:
    """The int8 screen's block values x̃·ỹ_j = P·fl(c·d_j) (module docstring), float64 (b, w):
    the int32 product in `buffers[0]`, the values in `buffers[1]` (flat, ≥ b·w elements each)."""
    shape = (len(queries), len(references))
    exact = int8_mm(queries.values, references, buffers[0][: shape[0] * shape[1]].view(shape))
    factors = queries.scale.double()[:, None] * reference_scale.double()[None, :]  # exactly
    return torch.mul(exact, factors, out=buffers[1][: shape[0] * shape[1]].view(shape))


def row_norms(rows: torch.Tensor) -> np.ndarray:
    """Euclidean norm of each float32 row, from its squares summed in float64 (exact squares;
    relative error (n + 1)·2⁻⁵³). On the CPU numpy casts in small buffers, so no float64 copy
    of the rows is made: a fresh multi-MiB array is page-faulted in on each use, which on a
    busy machine cost as much as the rest of a query block's preparation."""
    if rows.device.type != "cpu":
        return rows.double().norm(dim=1).cpu().numpy()
    values = rows.numpy()
    return np.sqrt(np.einsum("ij,ij->i", values, values, dtype=np.float64))


def product(
    queries: torch.Tensor, references: torch.Tensor, arithmetic: Arithmetic, buffer: torch.Tensor | None
) -> torch.Tensor:
    """queries @ referencesᵀ in the screen's arithmetic: float32 where it rounds to float32,
    else the 16-bit type; written into `buffer` (flat, at least b × n_ref elements) when given."""
    out = None
    if buffer is not None:
        out = buffer[: len(queries) * len(references)].view(len(queries), len(references))
    if arithmetic.half and arithmetic.output_unit == 0.0:
        return torch.mm(queries, references.T, out_dtype=torch.float32, out=out)
    return torch.mm(queries, references.T, out=out)


def output_error(values: torch.Tensor, arithmetic: Arithmetic) -> torch.Tensor:
    """How far the rounding of the product's output may have moved each of `values` (float64
    copies of the 16-bit results; ±inf where there is no product): u_out·2^⌊log2|x|⌋, half a
    unit in the last place of x's binade, for x ≠ 0 of at least the type's smallest normal, and
    u_out times the smallest normal (half the subnormal spacing) below it and at 0; 0 where
    the output is float32 or x is not finite (`knn_bounds`, item 4).

    Why it holds. Rounding to nearest moves a value v to x = fl(v) by at most half the spacing of
    the type around v. With x in binade e (2^e ≤ |x| < 2^(e+1)), v lies in binade e too, where
    half the spacing is u_out·2^e, or x = ±2^e came from just below it, where the spacing is
    half as wide. The subnormal range has one fixed spacing, 2·u_out·(smallest normal)."""
    if arithmetic.output_unit == 0.0:
        return torch.zeros_like(values)
    floor = math.frexp(arithmetic.smallest_normal)[1] - 1  # log2 of the smallest normal
    exponent = (torch.frexp(values)[1] - 1).clamp(min=floor)  # ⌊log2|x|⌋ for x ≠ 0
    exponent = torch.where(values == 0, floor, exponent)
    error = torch.ldexp(torch.full_like(values, arithmetic.output_unit), exponent)
    return torch.where(torch.isfinite(values), error, 0.0)


def output_dtype(arithmetic: Arithmetic) -> torch.dtype:
    """The type `product` returns (the int8 screen: its exact int32 product, `int8_product`)."""
    if arithmetic.dtype == torch.int8:
        return torch.int32
    return torch.float32 if arithmetic.output_unit == 0.0 else arithmetic.dtype


def value_dtype(arithmetic: Arithmetic) -> torch.dtype:
    """The type a screen's selected values are kept in: float32 holds every 16-bit or float32
    product exactly, the int8 screen's scaled values need float64."""
    return torch.float64 if arithmetic.dtype == torch.int8 else torch.float32


def smallest_columns(values: torch.Tensor, count: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Column positions (b, count) of `count` smallest values of each row, unordered.

    Two stages, because one pass of minima is several times cheaper than a top-k over a wide
    row: split each row's columns into G-member groups (column c in group c mod (width // G),
    G = 32, a power of two), keep the `count`
    groups of smallest minimum, then take the top-`count` of their members. Exact: a value in
    a group left out is at least that group's minimum, which is at least every kept group's
    minimum, so `count` kept values are no larger than it. `scratch` (flat, ≥ b × width / 2
    elements of the values' type) holds the minima instead of fresh allocations.
    """
    rows, width = values.shape
    groups = width // _GROUP
    if groups < 4 * count:  # too few groups to prune anything
        return torch.topk(values, count, dim=1, largest=False, sorted=False).indices
    body = groups * _GROUP
    # group minima by halving (element-wise minima of the two halves, log2 G times): column c
    # meets every c + j·groups; contiguous halves stream through memory faster than a strided
    # reduction
    half = body // 2
    out = None if scratch is None else scratch[: rows * half].view(rows, half)
    minima = torch.minimum(values[:, :half], values[:, half:body], out=out)
    while minima.shape[1] > groups:  # in place: each level's output is its first input
        half = minima.shape[1] // 2
        minima = torch.minimum(minima[:, :half], minima[:, half:], out=minima[:, :half])
    chosen = torch.topk(minima, count, dim=1, largest=False, sorted=False).indices
    members = torch.arange(0, body, groups, device=values.device)
    columns = (chosen[:, :, None] + members).reshape(rows, count * _GROUP)
    if body < width:  # the last width % G columns belong to no group: always candidates
        tail = torch.arange(body, width, device=values.device).expand(rows, -1)
        columns = torch.cat((columns, tail), dim=1)
    picked = torch.topk(values.gather(1, columns), count, dim=1, largest=False, sorted=False).indices
    return columns.gather(1, picked)


def smallest_positions(values: np.ndarray | torch.Tensor, count: int) -> np.ndarray | torch.Tensor:
    """Column positions of the `count` smallest values of each row, unordered."""
    if isinstance(values, torch.Tensor):
        return torch.topk(values, count, dim=1, largest=False, sorted=False).indices
    if count >= values.shape[1]:
        return np.broadcast_to(np.arange(values.shape[1]), values.shape)
    return np.argpartition(values, count - 1, axis=1)[:, :count]


def take(values: np.ndarray | torch.Tensor, positions: np.ndarray | torch.Tensor):
    """values[row, positions[row]] for every row."""
    if isinstance(values, torch.Tensor):
        return values.gather(1, positions)
    return np.take_along_axis(values, positions, axis=1)


@contextlib.contextmanager
def exact_matmul_settings() -> Iterator[None]:
    """Keep float32 products in IEEE float32 (no TF32 or bf16 passes) and 16-bit products'
    reductions in float32 (no reduced-precision split-K), so that the bound holds; the settings
    are process-wide, so the caller's are restored."""
    cuda_matmul = torch.backends.cuda.matmul
    previous = (
        torch.get_float32_matmul_precision(),
        cuda_matmul.allow_bf16_reduced_precision_reduction,
        cuda_matmul.allow_fp16_reduced_precision_reduction,
    )
    torch.set_float32_matmul_precision("highest")
    cuda_matmul.allow_bf16_reduced_precision_reduction = False
    cuda_matmul.allow_fp16_reduced_precision_reduction = False
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous[0])
        cuda_matmul.allow_bf16_reduced_precision_reduction = previous[1]
        cuda_matmul.allow_fp16_reduced_precision_reduction = previous[2]
