"""Rigorous error bound of the k-NN engine's screen, and the test that a screen holds its answer.

Notation: u = 2⁻²⁴ (float32 unit roundoff), n = dim, γ_m(v) = m·v / (1 - m·v), ``fl`` rounding
to nearest (which errs by at most u|fl(x)| and u|x|). The *target* of reference j is what
refinement computes before rounding: cosine T_j = 1 - q̂·r̂_j, q̂ the query normalised exactly
and r̂_j the stored float32 unit reference; euclidean T_j = ‖q - r_j‖². The screen computes

    s̃_j = o + ṽ_j (+ w_j),   ṽ_j ≈ x̃·ỹ_j,

from float32 *prepared* rows x (query side) and y_j (reference side):
cosine x = -fl(q̂), y_j = r̂_j, o = 1, no w; euclidean z = fl(v - c) for a centre c (the mean
reference on the 16-bit screens, where it shrinks the products that cancel; c = 0, so z = v, in
float32), x = -2z_q (exact), y_j = z_j, o = ‖z_q‖² (float64), w_j = fl(‖z_j‖²) (stored). The
operands x̃, ỹ_j are x, y_j rounded to the screen's type with subnormals zeroed (`screen`), and
e_x = x - x̃, e_j = y_j - ỹ_j their residuals, whose norms are measured exactly, per row.
Per query let X̃ = ‖x̃‖, E_x = ‖e_x‖, Z = ‖z_q‖; per reference ζ_j = ‖y_j‖ (= ‖z_j‖), and over
the references R = max ζ_j, Ỹ = max ‖ỹ_j‖, E = max ‖e_j‖, κ = 1 + max ‖e_j‖/ζ_j (so that
‖e_j‖ ≤ (κ - 1)ζ_j and ‖ỹ_j‖ ≤ κζ_j). Every term below grows with R and Ỹ, so upper bounds of
them serve as well: for cosine references R is taken as 1 + 2.1u (item 1) and ‖ỹ_j‖ as
R + ‖e_j‖ (triangle inequality), rather than measured (`screen.to_operands`).
Then |s̃_j - T_j| is at most the sum of:

1. Preparation, |T - P| with P = 1 + x·y_j (cosine) or ‖z_q - z_j‖² (euclidean).
   Cosine: fl(q̂) = fl(q · fl(1/‖q‖)) errs by (2u + u²) per component, so
   |T - P| ≤ ‖fl(q̂) - q̂‖ ‖r̂_j‖ ≤ 2.1u (‖r̂_j‖ ≤ 1 + 2.1u). Euclidean with a centre:
   |z_i - (v_i - c_i)| ≤ u|z_i|, so ‖(z_q - z_j) - (q - r_j)‖ ≤ η = u(Z + ζ_j); with
   √P ≤ Z + ζ_j = η/u, |P - T| = |√P - √T|(√P + √T) ≤ η(2η/u + η) = (2u + u²)(Z + ζ_j)².
   Without a centre, P = T.
2. Operand rounding: x·y_j - x̃·ỹ_j = x̃·e_j + e_x·y_j exactly, so by Cauchy–Schwarz it is at
   most X̃‖e_j‖ + E_x ζ_j. This is the dominant term in 16 bits (≈ 2⁻⁹ per unit vector, measured
   rather than the worst case 2⁻⁸).
3. Accumulation: products of 16-bit operands are exact in float32, and a float32 sum of them
   in any order, with or without FMA, errs by at most γ_n(u_acc) Σ|x̃_i ỹ_i| ≤ γ_n(u_acc) X̃‖ỹ_j‖
   (Higham, Accuracy and Stability of Numerical Algorithms, §3.1); u_acc = u for float32 BLAS,
   whose rounded products γ_n also covers, and 4u for 16-bit kernels (`screen`: truncating
   tensor cores). The fused ``addmm`` adds w_j inside the sum: γ_{n+2}(u_acc)(X̃‖ỹ_j‖ + w_j).
   The int8 screen (cosine) sums integers exactly and then rounds once in float64, P·fl(c·d_j)
   with fl(c·d_j) exact (`screen`): an error of at most 2⁻⁵³|ṽ_j|, which u_acc = 2⁻⁵³ covers
   many times over (γ_{n+2} ≥ 3·2⁻⁵³); x̃ and ỹ_j are then the real numbers values·factor.
4. Output rounding: a product returned in bfloat16 (torch on the CPU) or float16 is rounded
   once more, by at most u_out|ṽ_j| ≤ u_out(1 + γ)X̃‖ỹ_j‖; u_out = 0 for float32 results.
   For cosine the screen knows each result p̃_j = -ṽ_j rounded, and the rounding moved it by at
   most h(p̃_j) = u_out·2^⌊log2|p̃_j|⌋ (`screen.output_error`): on neighbours, whose p̃ lie in
   [1/2, 1), that is 2⁻⁹ rather than the ≈ 2⁻⁸ of the uniform term. So the cosine coefficient
   a below leaves this term out, and every use adds h per score: s̃_j - h(p̃_j) ≤ T_j + a and
   T_j ≤ s̃_j + h(p̃_j) + a. Both s̃ ± h(p̃) = 1 - p̃ ∓ h(p̃) are strictly monotone in p̃ over
   the output type's numbers (p̃ ± h(p̃) increase with p̃: stepping up one number adds a whole
   spacing, the h of either side at most half of one), so they order the references as s̃ does.
5. Stored norms and the addition (euclidean): |w_j - ζ_j²| ≤ u(1 + u)ζ_j² (float64 norm
   rounded to float32), and fl(ṽ + w_j) when added outside the product errs by u(|ṽ_j| + w_j).

The float64 residues (the norms above, o, the sum with o) err relatively by ≤ (n + 8)·2⁻⁵²; a
factor 1 + 2⁻²⁰ on the sum and (n + 8)·2⁻⁵²(|o| + w_j + |ṽ_j|) cover them. Underflow, where
kernels flush subnormal products and sums, errs by < 2⁻¹²⁶ per operation: (2n + 8)·2⁻¹²⁶.
Overflow cannot happen: `knn` rejects euclidean rows of norm ≥ 2⁵⁶.

For cosine every term but the output rounding's is bounded with the maxima R, Ỹ, E into one δ
per query; the rounding's h(p̃_j) is added per reference (item 4). For euclidean
the terms grow with ζ_j, and one outlying long reference would widen every query's window; but
ζ_j ≤ ‖r_j - c‖/(1 - u) ≤ (1 + 2.1u)(Z + √T_j) by the triangle inequality, so the error is at
most g(T_j) = a + bζ̄ + cζ̄², ζ̄ = (1 + 2.1u)(Z + √T_j), with per-query a, b, c collected from the
terms above ((Z + ζ)² ≤ 2Z² + 2ζ²), increasing in T_j.

**When the screen holds the answer.** The answer is defined on refined distances rounded to
float32, D_j = fl(d̂_j), d̂_j the float64 refinement of d_j (cosine d = T, euclidean d = √T) with
error ε: absolute (n + 6)·2⁻⁵³·1.01 for cosine, relative (n + 3)·2⁻⁵³ for euclidean. Every
reference kept (the first k, or every tie of the k-th with tie_expansion, all within a
threshold t) has D_j ≤ D* = min(D_(k), t). The k references of smallest screened score have
T ≤ B_k, B_k = s̃_(k) + h(p̃_(k)) + δ for cosine (`screened_enough` is given the scores
s̃ + h(p̃) and compares s̃ - h(p̃) with the limits); for euclidean T - g(T) ≤ s̃_(k), a quadratic inequality
in √T whose larger root gives B_k. So D_(k) is at most their rounded refined distance; undoing
the roundings, every kept reference has T_j ≤ U = min(ρB_k + α, ρ_t·t_s + α) (t_s = t, or t²
for euclidean), where cosine ρ = (1 + u)/(1 - u), ρ_t = 1/(1 - u), α = (ρ + 1)ε; euclidean
ρ = ((1 + u)(1 + ε)²/(1 - u))², ρ_t = ((1 + ε)/(1 - u))², α = 0. So a kept reference has
s̃_j - h(p̃_j) ≤ L = U + δ (cosine) or s̃_j ≤ L = U + g(U) (euclidean). Once the m-th screened
score exceeds L (less its h), no reference left out of the screen can be kept, and only
candidates within L need refining.

**Refining in two steps.** The k-th smallest D over any k references is at least D_(k). So once
the k candidates of smallest screened score are refined, their largest D, D', bounds D* too:
D* ≤ min(D', t), and the threshold's argument above with t replaced by D' gives a second limit
L' = ρ_t·D' + α + δ (cosine, bounding s̃_j - h(p̃_j); D'² and g for euclidean) above which no
candidate can be kept
(`refined_limit`). D' is near s̃_(k), as screening errs far less than δ in practice, so L' is
about one δ above s̃_(k) where L is two: on 1,024-dim data about a third fewer candidates are
refined. A cosine D' of 2 may be a clipped distance, which bounds nothing: L' is then +∞.
Likewise a cosine D* of 2 (a threshold t ≥ 2, or D_(k) clipped) says only T_j ≤ 1 + ‖r̂_j‖
≤ 2 + 2.1u, which ρ_t·t + α can miss by about 0.1u: U ≥ 2 is raised to at least 2 + 2.2u.
"""

from __future__ import annotations

import numpy as np
import torch

from . import knn_inputs
from .screen import Arithmetic

UNIT = 2.0**-24
_DOUBLE_UNIT = 2.0**-53
_UNDERFLOW = 2.0**-126
_NORM_SLACK = 1 + 2.0**-20  # relative error of the float64 norms and sums in the bound's terms
_CLIPPED_REACH = 2.2 * UNIT  # above 2.1u: 1 - q̂·r̂ ≤ 1 + ‖r̂_j‖ ≤ 2 + 2.1u, with room for rounding
MAX_NORM = knn_inputs.MAX_NORM  # rows at least this long could overflow float32 squares and products


def gamma(terms: int, unit: float) -> float:
    return terms * unit / (1 - terms * unit)


def screening_error_bound(
    metric: str,
    dim: int,
    arithmetic: Arithmetic,
    queries: dict[str, np.ndarray],
    references: dict[str, float],
) -> np.ndarray:
    """Error coefficients per query (b, 4) float64, columns (a, b, c, Z) (module docstring):
    |s̃_j - T_j| ≤ a + h(p̃_j) (cosine, `screen.output_error`) or g(T_j) = a + bζ̄ + cζ̄²,
    ζ̄ = (1 + 2.1u)(Z + √T_j) (euclidean).

    Args:
        queries: per query row, "operand_norm" X̃, "residual" E_x, "offset" o and, for
            euclidean, "centred_norm" Z.
        references: "norm" R, "operand_norm" Ỹ, "residual" E, "relative_residual" κ - 1 and
            "centred" (0/1).
    """
    n, u, u_out = dim, UNIT, arithmetic.output_unit
    x_norm, x_residual, offset = queries["operand_norm"], queries["residual"], np.abs(queries["offset"])
    g = gamma(n + 2, arithmetic.accumulation_unit)
    residue = (n + 8) * 2 * _DOUBLE_UNIT
    underflow = (2 * n + 8) * _UNDERFLOW
    coefficients = np.zeros((len(x_norm), 4))
    if metric == "cosine":
        product = x_norm * references["operand_norm"]
        magnitude = (1 + u_out) * (1 + g) * product  # ≥ |ṽ|
        operands = x_norm * references["residual"] + x_residual * references["norm"]
        total = 2.1 * u + operands + g * product  # the output rounding: per score (item 4)
        coefficients[:, 0] = _NORM_SLACK * total + residue * (offset + magnitude) + underflow
        return coefficients
    kappa = 1 + references["relative_residual"]
    centred = queries["centred_norm"]
    preparation = (2 * u + u**2) * references["centred"]
    magnitude = (1 + u_out) * (1 + g) * x_norm * kappa  # |ṽ_j| ≤ magnitude·ζ_j
    linear = x_norm * (kappa - 1) + x_residual + g * x_norm * kappa + u_out * (1 + g) * x_norm * kappa
    linear = _NORM_SLACK * (linear + u * magnitude) + residue * magnitude
    square = _NORM_SLACK * (2 * preparation + g * (1 + u) + 2 * u * (1 + u)) + residue * (1 + u)
    constant = _NORM_SLACK * 2 * preparation * centred**2 + residue * offset + underflow
    coefficients[:, 0] = constant
    coefficients[:, 1] = linear * (1 + 2.1 * u)
    coefficients[:, 2] = square * (1 + 2.1 * u) ** 2
    coefficients[:, 3] = centred
    return coefficients


def screened_enough(
    scores: torch.Tensor,
    k: int,
    coefficients: torch.Tensor,
    threshold: float | None,
    metric: str,
    dim: int,
    low: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(whether each row's screened scores (b, m) provably hold its answer: bool (b,),
    L (b,): the largest screened score a kept reference can have), module docstring. Cosine
    scores whose output was rounded come as `scores` s̃ + h(p̃) and `low` s̃ - h(p̃) (item 4):
    L then bounds `low`."""
    ordered = scores.sort(dim=1).values
    kth = ordered[:, min(k, ordered.shape[1]) - 1]
    a, b, c, z = coefficients.unbind(1)
    if metric == "cosine":
        error = (dim + 6) * _DOUBLE_UNIT * 1.01
        rho, rho_threshold = (1 + UNIT) / (1 - UNIT), 1 / (1 - UNIT)
        alpha, threshold_score = (rho + 1) * error, threshold
        reach = kth + a
    else:
        error = (dim + 3) * _DOUBLE_UNIT
        rho = ((1 + UNIT) * (1 + error) ** 2 / (1 - UNIT)) ** 2
        rho_threshold = ((1 + error) / (1 - UNIT)) ** 2
        alpha, threshold_score = 0.0, None if threshold is None else threshold**2
        # T - g(T) ≤ s̃_(k) with t = √T: (1 - c)t² - (b + 2cZ)t - (a + bZ + cZ² + s̃_(k)) ≤ 0
        linear, constant = b + 2 * c * z, a + b * z + c * z * z + kth
        discriminant = (linear * linear + 4 * (1 - c) * constant).clamp(min=0)
        reach = ((linear + discriminant.sqrt()) / (2 * (1 - c))).square()
    limit = rho * reach + alpha
    if threshold_score is not None:
        limit = torch.minimum(limit, torch.full_like(limit, rho_threshold * threshold_score + alpha))
    if metric == "cosine":
        # D* ≥ 2 may be a clipped distance: it bounds T only by 1 + ‖r̂_j‖ ≤ 2 + 2.1u
        limit = torch.where(limit >= 2, limit.clamp(min=2 + _CLIPPED_REACH), limit)
    limit = _score_limit(limit, coefficients, metric)
    last = ordered[:, -1] if low is None else low.amax(1)
    return torch.isinf(last) | (last > limit), limit


def refined_limit(kth: torch.Tensor, coefficients: torch.Tensor, metric: str, dim: int) -> torch.Tensor:
    """L' (b,): the largest screened score a kept reference can have when k references of the
    row have refined distances (float32) at most `kth` (b,) float64 (module docstring)."""
    if metric == "cosine":
        error = (dim + 6) * _DOUBLE_UNIT * 1.01
        rho_threshold, alpha = 1 / (1 - UNIT), ((1 + UNIT) / (1 - UNIT) + 1) * error
        kth = torch.where(kth >= 2, torch.inf, kth)  # perhaps clipped: bounds nothing
        target = rho_threshold * kth + alpha
    else:
        error = (dim + 3) * _DOUBLE_UNIT
        target = ((1 + error) / (1 - UNIT)) ** 2 * kth.square()
    return _score_limit(target, coefficients, metric)


def _score_limit(target: torch.Tensor, coefficients: torch.Tensor, metric: str) -> torch.Tensor:
    """L = U + δ (cosine) or U + g(U) (euclidean) from the bound U on a kept reference's target,
    enlarged for the float64 arithmetic of the check."""
    a, b, c, z = coefficients.unbind(1)
    if metric == "cosine":
        limit = target + a
    else:
        root = z + target.clamp(min=0).sqrt()
        limit = target + a + b * root + c * root * root
    return limit + 2.0**-40 * limit.abs() + 2.0**-1000
