"""i-ResNet specifics: explicit JVP, the two log-det estimators, the Lipschitz bound, the inverse."""

from __future__ import annotations

import torch

from oodserve.models.flows.iresnet import ContractiveConv2d, ResidualBlock, elu_derivative


def _block(seed: int = 0) -> ResidualBlock:
    torch.manual_seed(seed)
    block = ResidualBlock(channels=4, hidden_channels=6, input_hw=(3, 3), coefficient=0.9, training_terms=3,
                          inference_terms=6, inference_probes=2, inverse_iterations=60, probe_seed=seed).double()
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.mul_(3.0)  # push the weights above the bound so the normalisation is active
    block.train()
    block.weights()
    block.eval()
    return block


def test_explicit_jvp_equals_torch_func_jvp() -> None:
    block = _block()
    inputs = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    vectors = torch.randn_like(inputs)
    weights = block.weights()
    _, first_pre, second_pre = block.residual(inputs, weights)
    explicit = block.jacobian_vector_product(vectors, first_pre, second_pre, weights)
    _, reference = torch.func.jvp(block.g, (inputs,), (vectors,))
    assert torch.allclose(explicit, reference, atol=1e-12)


def test_inference_estimator_equals_training_estimator_for_same_probes() -> None:
    block = _block(1)
    inputs = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    probes = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    explicit = block.log_det_explicit(inputs, probes, terms=5)
    autograd = block.log_det_autograd(inputs.clone().requires_grad_(True), probes, terms=5)
    assert torch.allclose(explicit, autograd, atol=1e-12)
    # eval-mode forward uses the stored probes with the inference number of terms
    _, logabsdet = block(inputs)
    assert torch.allclose(logabsdet, block.log_det_explicit(inputs, block.probes, block.inference_terms))


def test_soft_spectral_bound_keeps_operator_norm_below_coefficient() -> None:
    torch.manual_seed(2)
    layer = ContractiveConv2d(3, 5, 3, (6, 6), coefficient=0.7).double()
    with torch.no_grad():
        layer.weight.mul_(10.0)
    layer.train()
    for _ in range(30):
        layer.refresh()
    weight = layer.normalized_weight().detach()
    # operator norm of the convolution by many power iterations on the true operator
    vector = torch.randn(1, 3, 6, 6, dtype=torch.float64)
    for _ in range(100):
        vector = torch.nn.functional.conv_transpose2d(layer.linear(vector, weight), weight, padding=1)
        vector = vector / vector.norm()
    norm = layer.linear(vector, weight).norm().item()
    # the bound uses a power-iteration estimate of sigma, which approaches the true norm from below
    assert norm <= 0.7 * 1.01


def test_training_forward_is_differentiable_and_inverse_converges() -> None:
    block = _block(3)
    block.train()
    inputs = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    outputs, logabsdet = block(inputs)
    logabsdet.sum().backward()
    assert block.first.weight.grad is not None and torch.isfinite(block.first.weight.grad).all()
    block.eval()
    with torch.no_grad():
        outputs, _ = block(inputs)
        assert (block.inverse(outputs) - inputs).abs().max().item() < 1e-6


def test_elu_derivative() -> None:
    values = torch.tensor([-2.0, -0.1, 0.0, 0.3, 4.0], dtype=torch.float64, requires_grad=True)
    (gradient,) = torch.autograd.grad(torch.nn.functional.elu(values).sum(), values)
    assert torch.allclose(elu_derivative(values.detach()), gradient)
