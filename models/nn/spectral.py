"""Spectral normalisation with a soft bound, power iteration on the true linear / convolution operator:
the one implementation behind SNGP's bi-Lipschitz backbone and the i-ResNet's contractive residual blocks.

Liu et al. 2020 ("Simple and principled uncertainty estimation with deterministic deep learning via
distance awareness", Sec. 3.2, Eq. 7): the weight is rescaled by `c / sigma` only when its spectral
norm `sigma` exceeds the bound `c`. For convolutions the norm is that of the convolution operator
on the layer's real input shape (Gouk et al. 2018; the edward2 `SpectralNormalizationConv2D`),
not of the reshaped kernel matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def soft_spectral_scale(sigma: torch.Tensor, spectral_bound: float) -> torch.Tensor:
    """Factor `max(1, sigma / c)` that divides the weight: identity when `sigma <= c`."""
    return torch.clamp(sigma / spectral_bound, min=1.0)


def _unit(tensor: torch.Tensor) -> torch.Tensor:
    return tensor / tensor.norm().clamp_min(1e-12)


class SpectralNormalizedLayer(nn.Module):
    """Base class: a weight, persistent power-iteration vectors `u`, `v` and the current estimate `sigma`.

    In training mode each forward runs `power_iterations` steps of power iteration (no gradient),
    then `sigma = <u, A v>` with the gradient flowing through the weight, and uses
    `W / max(1, sigma / c)`. Switching to eval mode stores `sigma = <u, A v>` of the current weight,
    and eval mode uses that stored value, so the normalised weight is a constant (what ONNX export
    sees). `refresh_sigma` converges the estimate after training.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None
    left_vector: torch.Tensor
    right_vector: torch.Tensor
    sigma: torch.Tensor

    def __init__(self, spectral_bound: float, power_iterations: int) -> None:
        super().__init__()
        if spectral_bound <= 0:
            raise ValueError("spectral_bound must be positive")
        self.spectral_bound = float(spectral_bound)
        self.power_iterations = int(power_iterations)

    # operator A (weight -> output) and its adjoint A^T on single "images" / vectors
    def apply_operator(self, weight: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def apply_adjoint(self, weight: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _init_vectors(self, left_shape: tuple[int, ...], right_shape: tuple[int, ...]) -> None:
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("left_vector", _unit(torch.randn(left_shape, generator=generator)))
        self.register_buffer("right_vector", _unit(torch.randn(right_shape, generator=generator)))
        self.register_buffer("sigma", torch.ones(()))

    @torch.no_grad()
    def _power_steps(self, steps: int) -> None:
        weight = self.weight.detach()
        left, right = self.left_vector, self.right_vector
        for _ in range(steps):
            right = _unit(self.apply_adjoint(weight, left))
            left = _unit(self.apply_operator(weight, right))
        self.left_vector.copy_(left)
        self.right_vector.copy_(right)

    @torch.no_grad()
    def refresh_sigma(self, max_iterations: int = 300, tolerance: float = 1e-6) -> float:
        """Run power iteration to convergence and store `sigma` (call after training, before export)."""
        previous = 0.0
        for _ in range(max_iterations):
            self._power_steps(1)
            current = float((self.left_vector * self.apply_operator(self.weight, self.right_vector)).sum())
            if abs(current - previous) <= tolerance * max(current, 1e-12):
                break
            previous = current
        self.sigma.fill_(current)
        return current

    def train(self, mode: bool = True) -> SpectralNormalizedLayer:
        """Entering eval mode stores sigma of the weight as it is now (it may have changed since the last
        training step, for example by an optimiser step or an averaged copy)."""
        if not mode:
            with torch.no_grad():
                self.sigma.copy_((self.left_vector * self.apply_operator(self.weight, self.right_vector)).sum())
        return super().train(mode)

    def refresh(self) -> None:
        """One training-time power-iteration update of the singular vectors (nothing in eval mode)."""
        if self.training:
            self._power_steps(self.power_iterations)

    def linear(self, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The layer's linear part (no bias) with `weight`: its Jacobian applied to `inputs`."""
        return self.apply_operator(weight, inputs)

    def normalized_weight(self) -> torch.Tensor:
        """`W / max(1, sigma / c)` (sigma re-estimated with gradient in training mode)."""
        if self.training:
            self._power_steps(self.power_iterations)
            sigma = (self.left_vector * self.apply_operator(self.weight, self.right_vector)).sum()
            self.sigma.copy_(sigma.detach())
        else:
            sigma = self.sigma
        return self.weight / soft_spectral_scale(sigma, self.spectral_bound)


class SpectralNormLinear(SpectralNormalizedLayer):
    """Linear layer `y = W_hat x + b` with `W` (out, in) softly normalised to spectral norm <= c."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        spectral_bound: float = 1.0,
        power_iterations: int = 1,
    ) -> None:
        super().__init__(spectral_bound, power_iterations)
        reference = nn.Linear(in_features, out_features, bias=bias)
        self.weight = reference.weight
        self.bias = reference.bias
        self._init_vectors((out_features,), (in_features,))

    def apply_operator(self, weight: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return weight @ right

    def apply_adjoint(self, weight: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        return weight.t() @ left

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """`(..., in) -> (..., out)`."""
        return F.linear(inputs, self.normalized_weight(), self.bias)


class SpectralNormConv2d(SpectralNormalizedLayer):
    """Conv2d whose operator norm on inputs of shape `(in_channels, *input_size)` is softly bounded by c.

    Power iteration uses `conv2d` as the operator and `conv_transpose2d` (with the output padding
    that restores the input size) as its adjoint, so `sigma` is the norm of the real linear map.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        input_size: tuple[int, int],
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        spectral_bound: float = 1.0,
        power_iterations: int = 1,
    ) -> None:
        super().__init__(spectral_bound, power_iterations)
        reference = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=bias)
        self.weight = reference.weight
        self.bias = reference.bias
        self.stride = stride
        self.padding = padding
        self.input_size = (int(input_size[0]), int(input_size[1]))
        output_size = tuple((size + 2 * padding - kernel_size) // stride + 1 for size in self.input_size)
        self.output_size = output_size
        self.output_padding = tuple(
            size_in - ((size_out - 1) * stride - 2 * padding + kernel_size)
            for size_in, size_out in zip(self.input_size, output_size)
        )
        self._init_vectors((1, out_channels, *output_size), (1, in_channels, *self.input_size))

    def apply_operator(self, weight: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        return F.conv2d(right, weight, stride=self.stride, padding=self.padding)

    def apply_adjoint(self, weight: torch.Tensor, left: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(
            left, weight, stride=self.stride, padding=self.padding, output_padding=self.output_padding
        )

    def forward(self, inputs: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """`(N, in_channels, H, W) -> (N, out_channels, H', W')`, with `weight` instead of the normalised weight when given."""
        weight = self.normalized_weight() if weight is None else weight
        return F.conv2d(inputs, weight, self.bias, stride=self.stride, padding=self.padding)


def spectral_layers(module: nn.Module) -> list[SpectralNormalizedLayer]:
    """All spectral-normalised layers inside `module`."""
    return [layer for layer in module.modules() if isinstance(layer, SpectralNormalizedLayer)]


def refresh_all_sigmas(module: nn.Module) -> None:
    """Converge the power iteration of every spectral-normalised layer in `module`."""
    for layer in spectral_layers(module):
        layer.refresh_sigma()
