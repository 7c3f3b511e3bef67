"""Soft spectral normalisation: measured operator norms of normalised linear and conv layers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oodserve.models.nn.spectral import SpectralNormConv2d, SpectralNormLinear, soft_spectral_scale, spectral_layers
from oodserve.models.sngp.backbone import ResidualCNNBackbone, SNGPConfig


def conv_operator_matrix(layer: SpectralNormConv2d, weight: torch.Tensor) -> torch.Tensor:
    """Dense matrix of the convolution operator on the layer's input shape (columns = basis images)."""
    channels = weight.shape[1]
    size = channels * layer.input_size[0] * layer.input_size[1]
    basis = torch.eye(size).reshape(size, channels, *layer.input_size)
    return F.conv2d(basis, weight, stride=layer.stride, padding=layer.padding).reshape(size, -1).t()


def exact_norm(matrix: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(matrix.double(), ord=2))


@pytest.mark.parametrize("stride", [1, 2])
def test_conv_operator_norm_is_bounded_by_c(stride: int) -> None:
    torch.manual_seed(0)
    bound = 1.5
    layer = SpectralNormConv2d(3, 4, 3, (7, 7), stride=stride, padding=1, spectral_bound=bound)
    with torch.no_grad():
        layer.weight.mul_(10.0)
    raw_norm = exact_norm(conv_operator_matrix(layer, layer.weight.detach()))
    assert raw_norm > bound  # the bound is active
    layer.train()
    for _ in range(5):
        layer(torch.randn(2, 3, 7, 7))
    layer.refresh_sigma()
    layer.eval()
    normalised_norm = exact_norm(conv_operator_matrix(layer, layer.normalized_weight().detach()))
    assert normalised_norm <= bound + 1e-3
    assert normalised_norm == pytest.approx(bound, abs=1e-3)
    assert float(layer.sigma) == pytest.approx(raw_norm, rel=1e-4)


def test_conv_norm_is_the_operator_norm_not_the_reshaped_kernel_norm() -> None:
    torch.manual_seed(1)
    layer = SpectralNormConv2d(2, 3, 3, (6, 6), padding=1, spectral_bound=100.0)
    layer.refresh_sigma()
    operator_norm = exact_norm(conv_operator_matrix(layer, layer.weight.detach()))
    kernel_norm = exact_norm(layer.weight.detach().reshape(3, -1))
    assert float(layer.sigma) == pytest.approx(operator_norm, rel=1e-4)
    assert abs(operator_norm - kernel_norm) > 1e-2


def test_soft_bound_leaves_small_weights_untouched() -> None:
    torch.manual_seed(2)
    layer = SpectralNormLinear(5, 4, spectral_bound=1e3)
    layer.refresh_sigma()
    layer.eval()
    assert torch.equal(layer.normalized_weight(), layer.weight)
    assert float(soft_spectral_scale(torch.tensor(0.5), 1.0)) == 1.0
    assert float(soft_spectral_scale(torch.tensor(3.0), 1.5)) == 2.0


def test_linear_norm_is_bounded_and_gradient_flows() -> None:
    torch.manual_seed(3)
    layer = SpectralNormLinear(6, 5, spectral_bound=0.9)
    with torch.no_grad():
        layer.weight.mul_(5.0)
    layer.train()
    layer(torch.randn(3, 6)).sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    layer.refresh_sigma()
    layer.eval()
    assert exact_norm(layer.normalized_weight().detach()) <= 0.9 + 1e-3


def test_every_backbone_layer_is_bounded_after_training_steps() -> None:
    torch.manual_seed(4)
    bound = 0.8
    backbone = ResidualCNNBackbone(SNGPConfig(widths=(2, 3, 3), spectral_bound=bound, image_size=8))
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.5)
    backbone.train()
    for _ in range(3):
        optimizer.zero_grad()
        backbone(torch.randn(4, 1, 8, 8)).pow(2).sum().backward()
        optimizer.step()
    layers = spectral_layers(backbone)
    assert len(layers) == 9  # stem, 2 transitions, 3 blocks x 2 convs
    for layer in layers:
        layer.refresh_sigma()
    backbone.eval()
    for layer in layers:
        norm = exact_norm(conv_operator_matrix(layer, layer.normalized_weight().detach()))
        assert norm <= bound + 1e-3
