"""Image flow layers shared by the families: actnorm, LU 1x1 convolution, squeeze, zero-initialised conv.

Glow (Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1 Convolutions").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oodserve.models.flows.base import Transform


class ActNorm(Transform):
    """Per-channel affine `y = (x + bias) * exp(log_scale)` (Glow sec. 3.1), data-dependent init.

    Channels are dim 1 of `(N, C, H, W)` or `(N, D)`. On the first training batch the bias and scale
    are set so that the outputs have zero mean and unit variance per channel.
    log|det| = (H W) * sum(log_scale) per example.
    """

    initialized: Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(channels))
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.register_buffer("initialized", torch.tensor(0.0))

    def _view(self, values: Tensor, inputs: Tensor) -> Tensor:
        return values.reshape((1, -1) + (1,) * (inputs.dim() - 2))

    @torch.no_grad()
    def initialize_from(self, inputs: Tensor) -> None:
        """Set bias and scale from a batch `(N, C, ...)` so the outputs are standardised."""
        per_channel = inputs.transpose(0, 1).reshape(inputs.shape[1], -1)
        self.bias.copy_(-per_channel.mean(dim=1))
        self.log_scale.copy_(-torch.log(per_channel.std(dim=1) + 1e-6))
        self.initialized.fill_(1.0)

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        if self.training and not bool(self.initialized):
            self.initialize_from(inputs)
        outputs = (inputs + self._view(self.bias, inputs)) * torch.exp(self._view(self.log_scale, inputs))
        positions = inputs[0, 0].numel()
        logabsdet = (self.log_scale.sum() * positions).expand(inputs.shape[0])
        return outputs, logabsdet

    def inverse(self, outputs: Tensor) -> Tensor:
        return outputs * torch.exp(-self._view(self.log_scale, outputs)) - self._view(self.bias, outputs)


class InvertibleConv1x1(Transform):
    """Invertible 1x1 convolution with an LU-parametrised weight (Glow sec. 3.2).

    W = P L (U + diag(sign * exp(log_s))) with P a fixed permutation, L unit lower triangular and U
    strictly upper triangular, so log|det W| = sum(log_s) without `slogdet` (which ONNX lacks).
    log|det| of the convolution = (H W) * sum(log_s). Works on `(N, C, H, W)` and `(N, C)`.
    """

    permutation: Tensor
    sign_diagonal: Tensor
    lower_mask: Tensor
    identity: Tensor

    def __init__(self, channels: int) -> None:
        super().__init__()
        orthogonal, _ = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
        permutation, lower, upper = torch.linalg.lu(orthogonal)
        diagonal = torch.diagonal(upper)
        self.register_buffer("permutation", permutation.float())
        self.register_buffer("sign_diagonal", torch.sign(diagonal).float())
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), diagonal=-1))
        self.register_buffer("identity", torch.eye(channels))
        self.lower = nn.Parameter(lower.float() * self.lower_mask)
        self.upper = nn.Parameter(torch.triu(upper, diagonal=1).float())
        self.log_diagonal = nn.Parameter(torch.log(torch.abs(diagonal)).float())
        self.frozen_inverse: Tensor | None = None

    def weight(self) -> Tensor:
        """The `(C, C)` weight matrix built from its LU factors."""
        lower = self.lower * self.lower_mask + self.identity
        diagonal = self.identity * (self.sign_diagonal * torch.exp(self.log_diagonal)).unsqueeze(0)
        upper = self.upper * self.lower_mask.transpose(0, 1) + diagonal
        return self.permutation @ lower @ upper

    def freeze_inverse(self) -> None:
        """Precompute W^-1 (in float64) so `inverse` is a plain matmul, as needed for ONNX export."""
        with torch.no_grad():
            self.frozen_inverse = torch.linalg.inv(self.weight().double()).to(self.lower.dtype)

    def _apply_matrix(self, matrix: Tensor, inputs: Tensor) -> Tensor:
        if inputs.dim() == 2:
            return inputs @ matrix.transpose(0, 1)
        return F.conv2d(inputs, matrix[:, :, None, None])

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        positions = inputs[0, 0].numel()
        logabsdet = (self.log_diagonal.sum() * positions).expand(inputs.shape[0])
        return self._apply_matrix(self.weight(), inputs), logabsdet

    def inverse(self, outputs: Tensor) -> Tensor:
        inverse_weight = self.frozen_inverse if self.frozen_inverse is not None else torch.linalg.inv(self.weight())
        return self._apply_matrix(inverse_weight.to(outputs.dtype), outputs)


def squeeze2x2(inputs: Tensor) -> Tensor:
    """Space-to-depth `(N, C, H, W) -> (N, 4C, H/2, W/2)` (RealNVP sec. 3.6)."""
    batch, channels, height, width = inputs.shape
    blocks = inputs.reshape(batch, channels, height // 2, 2, width // 2, 2)
    return blocks.permute(0, 1, 3, 5, 2, 4).reshape(batch, channels * 4, height // 2, width // 2)


def unsqueeze2x2(inputs: Tensor) -> Tensor:
    """Inverse of `squeeze2x2`: `(N, 4C, H, W) -> (N, C, 2H, 2W)`."""
    batch, channels, height, width = inputs.shape
    blocks = inputs.reshape(batch, channels // 4, 2, 2, height, width)
    return blocks.permute(0, 1, 4, 2, 5, 3).reshape(batch, channels // 4, height * 2, width * 2)


class Squeeze(Transform):
    """`squeeze2x2` as a volume-preserving transform."""

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        zeros = torch.zeros(inputs.shape[0], dtype=inputs.dtype, device=inputs.device)
        return squeeze2x2(inputs), zeros

    def inverse(self, outputs: Tensor) -> Tensor:
        return unsqueeze2x2(outputs)


class ZeroConv2d(nn.Module):
    """3x3 convolution initialised at zero with a learned output scale exp(3 * s) (Glow's last layer)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        nn.init.zeros_(self.conv.weight)
        assert self.conv.bias is not None
        nn.init.zeros_(self.conv.bias)
        self.log_gain = nn.Parameter(torch.zeros(1, out_channels, 1, 1))

    def forward(self, inputs: Tensor) -> Tensor:
        return self.conv(inputs) * torch.exp(3.0 * self.log_gain)


def coupling_network(in_channels: int, hidden_channels: int, out_channels: int) -> nn.Module:
    """Glow's coupling network NN(): conv3x3 -> ReLU -> conv1x1 -> ReLU -> zero-initialised conv3x3."""
    return nn.Sequential(
        nn.Conv2d(in_channels, hidden_channels, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(hidden_channels, hidden_channels, kernel_size=1),
        nn.ReLU(),
        ZeroConv2d(hidden_channels, out_channels),
    )
