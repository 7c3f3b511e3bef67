"""Monotonic rational-quadratic splines with linear tails (Durkan et al. 2019, "Neural Spline Flows").

Pure tensor functions that export to ONNX: the bin of each input is found by a comparison-sum
over the inner knots (no `searchsorted`), parameters are picked with `gather`, and the
inside/outside-the-interval choice is made with `torch.where` (no boolean-mask indexing).
Outside `[-tail_bound, tail_bound]` the transform is the identity (boundary derivatives are 1).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_BIN_WIDTH = 1e-3
MIN_BIN_HEIGHT = 1e-3
MIN_DERIVATIVE = 1e-3
# softplus(IDENTITY_DERIVATIVE_SHIFT) + MIN_DERIVATIVE == 1, so zero parameters give the identity.
IDENTITY_DERIVATIVE_SHIFT = math.log(math.expm1(1.0 - MIN_DERIVATIVE))


def spline_parameter_count(bins: int) -> int:
    """Unnormalised parameters per transformed coordinate: K widths, K heights, K - 1 inner derivatives."""
    return 3 * bins - 1


def _knots(unnormalized: Tensor, tail_bound: float, minimum: float) -> tuple[Tensor, Tensor]:
    """Bin sizes `(..., K)` and knot positions `(..., K + 1)` spanning `[-B, B]`."""
    bins = unnormalized.shape[-1]
    sizes = minimum + (1.0 - minimum * bins) * torch.softmax(unnormalized, dim=-1)
    cumulative = torch.cumsum(sizes, dim=-1)
    knots = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative], dim=-1)
    knots = 2.0 * tail_bound * knots - tail_bound
    # Pin both ends exactly so rounding cannot open a gap at the boundary.
    knots = torch.cat([torch.full_like(knots[..., :1], -tail_bound), knots[..., 1:-1],
                       torch.full_like(knots[..., :1], tail_bound)], dim=-1)
    return knots[..., 1:] - knots[..., :-1], knots


def bin_index(knots: Tensor, values: Tensor) -> Tensor:
    """Index in `0..K-1` of the bin holding each value: number of inner knots `<=` it (comparison-sum).

    knots `(..., K + 1)`, values `(...)` -> int64 `(...)`."""
    inner = knots[..., 1:-1]
    return (values.unsqueeze(-1) >= inner).to(torch.int64).sum(dim=-1)


def _pick(table: Tensor, index: Tensor) -> Tensor:
    return torch.gather(table, -1, index.unsqueeze(-1)).squeeze(-1)


def rational_quadratic_spline(
    inputs: Tensor,
    unnormalized_widths: Tensor,
    unnormalized_heights: Tensor,
    unnormalized_derivatives: Tensor,
    inverse: bool = False,
    tail_bound: float = 3.0,
) -> tuple[Tensor, Tensor]:
    """Elementwise monotonic RQ spline (Durkan et al. 2019, eqs. 4-8 and appendix A).

    inputs `(...)`, widths and heights `(..., K)`, inner derivatives `(..., K - 1)` ->
    (outputs `(...)`, log|d outputs / d inputs| `(...)`). With `inverse=True` the inverse map is
    applied and the returned log-derivative is that of the inverse.
    """
    widths, x_knots = _knots(unnormalized_widths, tail_bound, MIN_BIN_WIDTH)
    heights, y_knots = _knots(unnormalized_heights, tail_bound, MIN_BIN_HEIGHT)
    inner_derivatives = MIN_DERIVATIVE + F.softplus(unnormalized_derivatives + IDENTITY_DERIVATIVE_SHIFT)
    ones = torch.ones_like(inner_derivatives[..., :1])
    derivatives = torch.cat([ones, inner_derivatives, ones], dim=-1)

    inside = (inputs >= -tail_bound) & (inputs <= tail_bound)
    clamped = torch.clamp(inputs, -tail_bound, tail_bound)
    index = bin_index(y_knots if inverse else x_knots, clamped)
    x_k, y_k = _pick(x_knots, index), _pick(y_knots, index)
    w_k, h_k = _pick(widths, index), _pick(heights, index)
    d_k, d_k1 = _pick(derivatives, index), _pick(derivatives, index + 1)
    slope = h_k / w_k
    curvature = d_k1 + d_k - 2.0 * slope

    if inverse:
        offset = clamped - y_k
        a = h_k * (slope - d_k) + offset * curvature
        b = h_k * d_k - offset * curvature
        c = -slope * offset
        discriminant = torch.clamp(b * b - 4.0 * a * c, min=0.0)
        xi = (2.0 * c) / (-b - torch.sqrt(discriminant))
        xi = torch.clamp(xi, 0.0, 1.0)
        spline_out = xi * w_k + x_k
    else:
        xi = torch.clamp((clamped - x_k) / w_k, 0.0, 1.0)
        xi_one_minus = xi * (1.0 - xi)
        spline_out = y_k + h_k * (slope * xi * xi + d_k * xi_one_minus) / (slope + curvature * xi_one_minus)

    xi_one_minus = xi * (1.0 - xi)
    denominator = slope + curvature * xi_one_minus
    derivative_numerator = slope * slope * (d_k1 * xi * xi + 2.0 * slope * xi_one_minus + d_k * (1.0 - xi) ** 2)
    log_derivative = torch.log(derivative_numerator) - 2.0 * torch.log(denominator)
    if inverse:
        log_derivative = -log_derivative
    outputs = torch.where(inside, spline_out, inputs)
    return outputs, torch.where(inside, log_derivative, torch.zeros_like(log_derivative))
