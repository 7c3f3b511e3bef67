"""Rational-quadratic splines: monotone, invertible, correct log-derivative, identity tails (hypothesis)."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oodserve.models.flows.splines import bin_index, rational_quadratic_spline


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 10_000), bins=st.integers(2, 10), tail_bound=st.floats(0.5, 5.0), scale=st.floats(0.0, 4.0))
def test_spline_is_monotone_invertible_and_log_derivative_is_exact(seed: int, bins: int, tail_bound: float, scale: float) -> None:
    generator = torch.Generator().manual_seed(seed)
    count = 64
    inputs, _ = torch.sort(torch.randn(count, generator=generator, dtype=torch.float64) * tail_bound * 1.5)
    widths = scale * torch.randn(1, bins, generator=generator, dtype=torch.float64).expand(count, bins)
    heights = scale * torch.randn(1, bins, generator=generator, dtype=torch.float64).expand(count, bins)
    derivatives = scale * torch.randn(1, bins - 1, generator=generator, dtype=torch.float64).expand(count, bins - 1)

    outputs, log_derivative = rational_quadratic_spline(inputs, widths, heights, derivatives, tail_bound=tail_bound)
    assert torch.all(outputs[1:] >= outputs[:-1])  # same spline for every input: monotone in the input
    recovered, inverse_log_derivative = rational_quadratic_spline(
        outputs, widths, heights, derivatives, inverse=True, tail_bound=tail_bound
    )
    assert torch.allclose(recovered, inputs, atol=1e-8)
    assert torch.allclose(inverse_log_derivative, -log_derivative, atol=1e-8)

    variable = inputs.clone().requires_grad_(True)
    (gradient,) = torch.autograd.grad(
        rational_quadratic_spline(variable, widths, heights, derivatives, tail_bound=tail_bound)[0].sum(), variable
    )
    assert torch.allclose(gradient.log(), log_derivative, atol=1e-8)
    outside = inputs.abs() > tail_bound
    assert torch.equal(outputs[outside], inputs[outside])
    assert torch.all(log_derivative[outside] == 0)


def test_bin_index_is_comparison_sum() -> None:
    knots = torch.tensor([[-1.0, -0.5, 0.0, 0.5, 1.0]])
    values = torch.tensor([[-1.0, -0.6, -0.5, 0.2, 0.99, 1.0]])
    assert bin_index(knots.expand(6, 5), values[0]).tolist() == [0, 0, 1, 2, 3, 3]


def test_zero_parameters_give_the_identity() -> None:
    inputs = torch.linspace(-4, 4, 33, dtype=torch.float64)
    outputs, log_derivative = rational_quadratic_spline(
        inputs, torch.zeros(33, 5, dtype=torch.float64), torch.zeros(33, 5, dtype=torch.float64),
        torch.zeros(33, 4, dtype=torch.float64), tail_bound=3.0,
    )
    assert torch.allclose(outputs, inputs, atol=1e-10)
    assert torch.allclose(log_derivative, torch.zeros_like(log_derivative), atol=1e-10)
