"""RealNVP / Glow multi-scale flow (Dinh et al. 2016; Kingma & Dhariwal 2018) for images `(N, C, H, W)`.

One step = actnorm -> LU 1x1 convolution -> affine coupling with a bounded scale. A level =
squeeze (when H and W are even) -> K steps -> factor-out of half the channels, whose density is a
Gaussian conditioned on the kept half (a learned zero-initialised conv, Glow's "split prior").
The factored latents are standardised inside the transform, so the whole flow ends in `N(0, I)`
and the per-level log-densities `log p(z_level | kept)` (nats, `(N,)`) are returned as extra signals.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oodserve.models.flows.base import (
    CompositeTransform,
    Flow,
    Transform,
    gaussian_log_prob,
    sum_except_batch,
)
from oodserve.models.flows.layers import ActNorm, InvertibleConv1x1, ZeroConv2d, coupling_network, squeeze2x2, unsqueeze2x2
from oodserve.models.flows.preprocessing import LogitTransform


class AffineCoupling(Transform):
    """Affine coupling (RealNVP eq. 7, Glow table 1) with a bounded scale.

    Split channels `x = (x_a, x_b)`; `(shift, raw) = NN(x_a)`; `scale = sigmoid(raw + 2) in (0, 1)`;
    `y_b = (x_b + shift) * scale`. log|det| = sum log(scale). The bound keeps training stable.
    """

    def __init__(self, channels: int, hidden_channels: int) -> None:
        super().__init__()
        self.kept_channels = channels // 2
        self.transformed_channels = channels - self.kept_channels
        self.network = coupling_network(self.kept_channels, hidden_channels, 2 * self.transformed_channels)

    def _shift_and_log_scale(self, kept: Tensor) -> tuple[Tensor, Tensor]:
        parameters = self.network(kept)
        shift = parameters[:, : self.transformed_channels]
        log_scale = F.logsigmoid(parameters[:, self.transformed_channels :] + 2.0)
        return shift, log_scale

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        kept, transformed = inputs[:, : self.kept_channels], inputs[:, self.kept_channels :]
        shift, log_scale = self._shift_and_log_scale(kept)
        outputs = (transformed + shift) * torch.exp(log_scale)
        return torch.cat([kept, outputs], dim=1), sum_except_batch(log_scale)

    def inverse(self, outputs: Tensor) -> Tensor:
        kept, transformed = outputs[:, : self.kept_channels], outputs[:, self.kept_channels :]
        shift, log_scale = self._shift_and_log_scale(kept)
        return torch.cat([kept, transformed * torch.exp(-log_scale) - shift], dim=1)


CouplingFactory = Callable[[int], Transform]


def glow_step(channels: int, coupling_factory: CouplingFactory) -> CompositeTransform:
    """One Glow step of flow: actnorm -> invertible 1x1 conv -> coupling (affine for Glow, spline for NSF)."""
    return CompositeTransform([ActNorm(channels), InvertibleConv1x1(channels), coupling_factory(channels)])


class GlowMultiscale(Transform):
    """The multi-scale architecture: `(N, C, H, W) -> (N, C H W)` standardised latents.

    Latent order in the output: level 0's factored latent (flattened), level 1's, ..., the final one.
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        levels: int,
        steps_per_level: int,
        coupling_factory: CouplingFactory,
    ) -> None:
        super().__init__()
        channels, height, width = input_shape
        self.squeeze_flags: list[bool] = []
        self.level_steps = nn.ModuleList()
        self.split_priors = nn.ModuleList()
        self.factored_shapes: list[tuple[int, int, int]] = []
        for level in range(levels):
            squeeze = height % 2 == 0 and width % 2 == 0
            if squeeze:
                channels, height, width = channels * 4, height // 2, width // 2
            self.squeeze_flags.append(squeeze)
            self.level_steps.append(
                CompositeTransform([glow_step(channels, coupling_factory) for _ in range(steps_per_level)])
            )
            if level < levels - 1:
                kept = channels // 2
                factored = channels - kept
                self.split_priors.append(ZeroConv2d(kept, 2 * factored))
                self.factored_shapes.append((factored, height, width))
                channels = kept
        self.final_shape = (channels, height, width)
        self.final_mean = nn.Parameter(torch.zeros(1, *self.final_shape))
        self.final_log_std = nn.Parameter(torch.zeros(1, *self.final_shape))

    def _split_prior(self, level: int, kept: Tensor) -> tuple[Tensor, Tensor]:
        parameters = self.split_priors[level](kept)
        factored = self.factored_shapes[level][0]
        return parameters[:, :factored], parameters[:, factored:]

    def forward_with_levels(self, inputs: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Returns `(z (N, D), logabsdet (N,), [log p(z_level) (N,) for each level incl. the final])`."""
        hidden = inputs
        logabsdet = torch.zeros(inputs.shape[0], dtype=inputs.dtype, device=inputs.device)
        latents: list[Tensor] = []
        level_log_probs: list[Tensor] = []
        for level, steps in enumerate(self.level_steps):
            if self.squeeze_flags[level]:
                hidden = squeeze2x2(hidden)
            hidden, step_logabsdet = steps(hidden)
            logabsdet = logabsdet + step_logabsdet
            if level < len(self.split_priors):
                kept_channels = hidden.shape[1] - self.factored_shapes[level][0]
                kept, factored = hidden[:, :kept_channels], hidden[:, kept_channels:]
                mean, log_std = self._split_prior(level, kept)
                level_log_probs.append(gaussian_log_prob(factored, mean, log_std))
                latents.append(((factored - mean) * torch.exp(-log_std)).reshape(inputs.shape[0], -1))
                logabsdet = logabsdet - sum_except_batch(log_std.expand_as(factored))
                hidden = kept
        level_log_probs.append(gaussian_log_prob(hidden, self.final_mean, self.final_log_std))
        latents.append(((hidden - self.final_mean) * torch.exp(-self.final_log_std)).reshape(inputs.shape[0], -1))
        logabsdet = logabsdet - self.final_log_std.sum()
        return torch.cat(latents, dim=1), logabsdet, level_log_probs

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        latent, logabsdet, _ = self.forward_with_levels(inputs)
        return latent, logabsdet

    def inverse(self, outputs: Tensor) -> Tensor:
        batch = outputs.shape[0]
        sizes = [math.prod(shape) for shape in self.factored_shapes] + [math.prod(self.final_shape)]
        pieces = torch.split(outputs, sizes, dim=1)
        hidden = pieces[-1].reshape(batch, *self.final_shape) * torch.exp(self.final_log_std) + self.final_mean
        for level in reversed(range(len(self.level_steps))):
            if level < len(self.split_priors):
                mean, log_std = self._split_prior(level, hidden)
                factored = pieces[level].reshape(batch, *self.factored_shapes[level]) * torch.exp(log_std) + mean
                hidden = torch.cat([hidden, factored], dim=1)
            hidden = cast(Transform, self.level_steps[level]).inverse(hidden)
            if self.squeeze_flags[level]:
                hidden = unsqueeze2x2(hidden)
        return hidden


def image_shape(shape: tuple[int, ...] | list[int]) -> tuple[int, int, int]:
    """A config's `input_shape` as the (C, H, W) of one image; ValueError for any other length."""
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (channels, height, width), got {list(shape)}")
    channels, height, width = (int(side) for side in shape)
    return channels, height, width


@dataclass
class GlowConfig:
    """Hyperparameters that rebuild a Glow flow (stored in checkpoints)."""

    input_shape: tuple[int, int, int] = (1, 28, 28)
    levels: int = 3
    steps_per_level: int = 8
    hidden_channels: int = 64
    logit_alpha: float = 0.05


def build_glow(config: GlowConfig | dict) -> Flow:
    """Glow on `u in [0, 1]^{C x H x W}`: logit pre-processing then the multi-scale transform."""
    if isinstance(config, dict):
        config = GlowConfig(**{**config, "input_shape": tuple(config.get("input_shape", (1, 28, 28)))})
    transform = CompositeTransform(
        [
            LogitTransform(config.logit_alpha),
            GlowMultiscale(
                image_shape(config.input_shape),
                config.levels,
                config.steps_per_level,
                lambda channels: AffineCoupling(channels, config.hidden_channels),
            ),
        ]
    )
    flow = Flow(transform, tuple(config.input_shape))
    flow.config = asdict(config)
    return flow
