"""The attentive contractive block: explicit JVP, both log-det estimators, the Lipschitz bound (power iteration
on the Jacobian at random inputs and a worst case found by gradient ascent), the inverse, Lambert's W."""

from __future__ import annotations

import math

import pytest
import torch

from oodserve.models.flows.attention import L2AttentionBlock, l2_attention_lipschitz_factor, lambert_w0


def _block(seed: int = 0, heads: int = 2, coefficient: float = 0.9) -> L2AttentionBlock:
    torch.manual_seed(seed)
    block = L2AttentionBlock(channels=4, input_hw=(3, 3), heads=heads, coefficient=coefficient, training_terms=3,
                             inference_terms=6, inference_probes=2, inverse_iterations=80, probe_seed=seed).double()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.mul_(4.0)  # large weights: sharp attention, the normalisation does the work
    return block.eval()


def test_lambert_w0_and_the_bound_factor() -> None:
    for value in (0.0, 0.5, 1.0, math.e, 72.0, 1e6):
        w = lambert_w0(value)
        assert w * math.exp(w) == pytest.approx(value, rel=1e-12, abs=1e-15)
    assert l2_attention_lipschitz_factor(196, 4) == pytest.approx(math.sqrt(196) / 2 * (4 * lambert_w0(195 / math.e) + 1))
    with pytest.raises(ValueError):
        lambert_w0(-1.0)


def test_explicit_jvp_equals_torch_func_jvp() -> None:
    block = _block()
    inputs = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    vectors = torch.randn_like(inputs)
    weights = block.weights()
    _, queries, attention = block.residual(inputs, weights)
    explicit = block.jacobian_vector_product(vectors, queries, attention, inputs, weights)
    _, reference = torch.func.jvp(block.g, (inputs,), (vectors,))
    assert torch.allclose(explicit, reference, atol=1e-12)


def test_inference_estimator_equals_training_estimator_and_exact_log_det() -> None:
    block = _block(1, coefficient=0.5)
    inputs = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    probes = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    explicit = block.log_det_explicit(inputs, probes, terms=5)
    autograd = block.log_det_autograd(inputs.clone().requires_grad_(True), probes, terms=5)
    assert torch.allclose(explicit, autograd, atol=1e-12)
    block.inference_terms = 60
    block.use_exact_trace()
    _, logabsdet = block(inputs)
    for index in range(2):
        jacobian = torch.autograd.functional.jacobian(lambda flat: (flat + block.g(flat.reshape(1, 4, 3, 3)).reshape(-1)),
                                                      inputs[index].reshape(-1))
        assert logabsdet[index].item() == pytest.approx(torch.linalg.slogdet(jacobian)[1].item(), abs=1e-8)


@pytest.mark.parametrize("heads", [1, 2])
def test_lipschitz_constant_stays_below_the_coefficient(heads: int) -> None:
    block = _block(2, heads=heads, coefficient=0.9)
    generator = torch.Generator().manual_seed(3)
    largest = 0.0
    for _ in range(4):  # spectral norm of J_g at random inputs by power iteration on J^T J
        point = torch.randn(1, 4, 3, 3, generator=generator, dtype=torch.float64) * 3.0
        vector = torch.randn(1, 4, 3, 3, generator=generator, dtype=torch.float64)
        for _ in range(60):
            _, forward = torch.func.jvp(block.g, (point,), (vector,))
            _, pullback = torch.func.vjp(block.g, point)
            (vector,) = pullback(forward)
            vector = vector / vector.norm()
        largest = max(largest, torch.func.jvp(block.g, (point,), (vector,))[1].norm().item())
    # a worst case by gradient ascent on ||g(x) - g(y)|| / ||x - y||
    x = (torch.randn(1, 4, 3, 3, generator=generator, dtype=torch.float64) * 2).requires_grad_(True)
    y = (x.detach() + 0.1 * torch.randn(1, 4, 3, 3, generator=generator, dtype=torch.float64)).requires_grad_(True)
    optimizer = torch.optim.Adam([x, y], lr=0.05)
    for _ in range(200):
        ratio = (block.g(x) - block.g(y)).norm() / (x - y).norm()
        optimizer.zero_grad()
        (-ratio).backward()
        optimizer.step()
        largest = max(largest, ratio.item())
    assert 0.0 < largest < 0.9


def test_inverse_is_a_fixed_point_iteration() -> None:
    block = _block(4)
    inputs = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    outputs, _ = block(inputs)
    assert (block.inverse(outputs) - inputs).abs().max().item() < 1e-6


def test_the_block_trains_its_weights() -> None:
    block = _block(5).train()
    inputs = torch.randn(4, 4, 3, 3, dtype=torch.float64)
    outputs, logabsdet = block(inputs)
    (outputs.square().sum() - logabsdet.sum()).backward()
    assert all(parameter.grad is not None and parameter.grad.abs().sum() > 0 for parameter in block.parameters())
