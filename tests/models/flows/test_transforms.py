"""Every family: exact inverse, log-det equal to the autograd Jacobian's log|det|, per-level densities."""

from __future__ import annotations

import math

import pytest
import torch

from oodserve.models.flows.layers import squeeze2x2
from oodserve.models.flows.preprocessing import LogitTransform, bits_per_dim, centre_of_bin, log_prob_from_bits_per_dim
from tests.models.flows.conftest import FAMILIES, IRESNET_EXACT, SMALL_IMAGE_SHAPE, perturbed_flow, use_exact_traces


def _flow(family: str, input_shape=SMALL_IMAGE_SHAPE):
    extra = IRESNET_EXACT if family.startswith("iresnet") else None
    flow = perturbed_flow(family, input_shape, extra=extra)
    use_exact_traces(flow)
    return flow


def _unit_inputs(count: int, shape, seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(count, *shape, generator=generator, dtype=torch.float64) * 0.96 + 0.02


@pytest.mark.parametrize("family", FAMILIES)
def test_inverse_round_trip(family: str) -> None:
    flow = _flow(family)
    inputs = _unit_inputs(4, SMALL_IMAGE_SHAPE)
    latent, _ = flow.transform(inputs)
    assert latent.shape == (4, math.prod(SMALL_IMAGE_SHAPE))
    assert (flow.transform.inverse(latent) - inputs).abs().max().item() < 1e-4
    noise = torch.randn(3, latent.shape[1], dtype=torch.float64)
    samples = flow.sample_from_noise(noise)
    assert (flow.transform(samples)[0] - noise).abs().max().item() < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_log_det_equals_autograd_jacobian(family: str) -> None:
    flow = _flow(family)
    inputs = _unit_inputs(2, SMALL_IMAGE_SHAPE)
    _, logabsdet = flow.transform(inputs)
    for index in range(inputs.shape[0]):
        jacobian = torch.autograd.functional.jacobian(
            lambda flat: flow.transform(flat.reshape(1, *SMALL_IMAGE_SHAPE))[0].reshape(-1), inputs[index].reshape(-1)
        )
        expected = torch.linalg.slogdet(jacobian)[1].item()
        assert logabsdet[index].item() == pytest.approx(expected, abs=1e-6)


def test_nice_on_vectors() -> None:
    flow = perturbed_flow("nice", (6,))
    inputs = _unit_inputs(3, (6,))
    latent, logabsdet = flow.transform(inputs)
    assert (flow.transform.inverse(latent) - inputs).abs().max().item() < 1e-10
    jacobian = torch.autograd.functional.jacobian(lambda v: flow.transform(v[None])[0][0], inputs[0])
    assert logabsdet[0].item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), abs=1e-8)


@pytest.mark.parametrize("family", ["glow", "nsf"])
def test_levels_add_up_to_the_log_density(family: str) -> None:
    """log p(u) = sum of per-level latent log-densities + log-dets of everything before the latents."""
    flow = _flow(family)
    inputs = _unit_inputs(3, SMALL_IMAGE_SHAPE)
    log_prob, levels = flow.log_prob_with_levels(inputs)
    assert len(levels) == 3 and all(level.shape == (3,) for level in levels)
    logit, multiscale = flow.transform.transforms
    hidden, logit_logabsdet = logit(inputs)
    steps_logabsdet = torch.zeros(3, dtype=torch.float64)
    for level, steps in enumerate(multiscale.level_steps):
        if multiscale.squeeze_flags[level]:
            hidden = squeeze2x2(hidden)
        hidden, step_logabsdet = steps(hidden)
        steps_logabsdet = steps_logabsdet + step_logabsdet
        if level < len(multiscale.split_priors):
            hidden = hidden[:, : hidden.shape[1] - multiscale.factored_shapes[level][0]]
    assert torch.allclose(log_prob, torch.stack(levels).sum(dim=0) + logit_logabsdet + steps_logabsdet)


def test_logit_transform_log_det_and_inverse() -> None:
    transform = LogitTransform(alpha=0.05)
    inputs = _unit_inputs(2, (5,))
    outputs, logabsdet = transform(inputs)
    jacobian = torch.autograd.functional.jacobian(lambda v: transform(v[None])[0][0], inputs[0])
    assert logabsdet[0].item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), abs=1e-10)
    assert torch.allclose(transform.inverse(outputs), inputs)


def test_bits_per_dim_definition() -> None:
    # The uniform density on [0,1]^D (log p = 0) costs exactly 8 bits per 8-bit pixel.
    assert bits_per_dim(torch.zeros(1), 784).item() == pytest.approx(8.0)
    assert log_prob_from_bits_per_dim(8.0, 784) == pytest.approx(0.0, abs=1e-9)
    assert log_prob_from_bits_per_dim(bits_per_dim(torch.tensor([123.0]), 10), 10).item() == pytest.approx(123.0)
    assert centre_of_bin(torch.tensor([0, 255])).tolist() == pytest.approx([0.5 / 256, 255.5 / 256])
