"""Pre-processing of 8-bit images for flows: dequantisation, logit transform, bits per dimension.

Definition used everywhere in this package (Theis et al. 2016; Dinh et al. 2016, RealNVP):
an 8-bit image `x in {0..255}^D` is mapped to `u in [0, 1]^D` and the flow models the density
of `u`. Training dequantises uniformly, `u = (x + v) / 256` with `v ~ U[0, 1)^D`; evaluation and the
exported graph use the deterministic centre of the bin, `u = (x + 0.5) / 256`. A model's `log_prob`
is the log density of `u` in nats, so the discrete log-likelihood is `log_prob - D ln 256` and

    bits/dim = -(log_prob - D ln 256) / (D ln 2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from oodserve.models.flows.base import Transform, sum_except_batch

PIXEL_LEVELS = 256


def dequantize_uniform(pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation for training: `u = (x + v) / 256`, `v ~ U[0,1)`; any shape, float out."""
    noise = torch.rand(pixels.shape, generator=generator, dtype=torch.float32, device=pixels.device)
    return (pixels.to(torch.float32) + noise) / PIXEL_LEVELS


def centre_of_bin(pixels: Tensor) -> Tensor:
    """Deterministic evaluation point `u = (x + 0.5) / 256` (also used inside the ONNX graph)."""
    return (pixels.to(torch.float32) + 0.5) / PIXEL_LEVELS


def unit_to_pixels(unit: Tensor) -> Tensor:
    """Inverse of `centre_of_bin`, clamped to the valid pixel range `[0, 255]`."""
    return torch.clamp(unit * PIXEL_LEVELS - 0.5, 0.0, PIXEL_LEVELS - 1.0)


def bits_per_dim(log_prob_unit: Tensor, dimension: int) -> Tensor:
    """Bits per dimension of the discrete 8-bit data from the log density of `u` (nats), `(N,) -> (N,)`."""
    return -(log_prob_unit - dimension * math.log(PIXEL_LEVELS)) / (dimension * math.log(2.0))


def log_prob_from_bits_per_dim(bpd: Tensor | float, dimension: int) -> Tensor | float:
    """Inverse of `bits_per_dim`."""
    return -bpd * dimension * math.log(2.0) + dimension * math.log(PIXEL_LEVELS)


class LogitTransform(Transform):
    """`y = logit(alpha + (1 - 2 alpha) u)` for `u in [0, 1]` (RealNVP, Dinh et al. 2016, sec. 4.1).

    log|dy/du| = log(1 - 2 alpha) - log p - log(1 - p) with p = alpha + (1 - 2 alpha) u, summed
    per example. `alpha` keeps the logit finite at the borders (1e-6 for MNIST, 0.05 for CIFAR-10).
    """

    def __init__(self, alpha: float = 0.05) -> None:
        super().__init__()
        self.alpha = float(alpha)

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        squashed = self.alpha + (1.0 - 2.0 * self.alpha) * inputs
        outputs = torch.log(squashed) - torch.log1p(-squashed)
        log_derivative = math.log(1.0 - 2.0 * self.alpha) - torch.log(squashed) - torch.log1p(-squashed)
        return outputs, sum_except_batch(log_derivative)

    def inverse(self, outputs: Tensor) -> Tensor:
        return (torch.sigmoid(outputs) - self.alpha) / (1.0 - 2.0 * self.alpha)
