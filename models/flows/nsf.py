"""Neural spline flow (Durkan et al. 2019): Glow's multi-scale architecture with rational-quadratic
spline couplings (linear tails) in place of affine ones, for images `(N, C, H, W)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from oodserve.models.flows.base import CompositeTransform, Flow, Transform, sum_except_batch
from oodserve.models.flows.glow import GlowMultiscale, image_shape
from oodserve.models.flows.layers import coupling_network
from oodserve.models.flows.preprocessing import LogitTransform
from oodserve.models.flows.splines import rational_quadratic_spline, spline_parameter_count


class RationalQuadraticCoupling(Transform):
    """Coupling whose transformed half goes through an elementwise RQ spline parametrised by NN(kept half).

    `(N, C, H, W)`: NN outputs `(N, C_b (3K - 1), H, W)`, i.e. K widths, K heights and K - 1 inner
    derivatives per transformed value. Zero-initialised last layer -> identity at the start.
    """

    def __init__(self, channels: int, hidden_channels: int, bins: int, tail_bound: float) -> None:
        super().__init__()
        self.kept_channels = channels // 2
        self.transformed_channels = channels - self.kept_channels
        self.bins = bins
        self.tail_bound = tail_bound
        self.network = coupling_network(
            self.kept_channels, hidden_channels, self.transformed_channels * spline_parameter_count(bins)
        )

    def _spline(self, kept: Tensor, transformed: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        batch, _, height, width = kept.shape
        parameters = self.network(kept).reshape(
            batch, self.transformed_channels, spline_parameter_count(self.bins), height, width
        ).permute(0, 1, 3, 4, 2)
        widths = parameters[..., : self.bins]
        heights = parameters[..., self.bins : 2 * self.bins]
        derivatives = parameters[..., 2 * self.bins :]
        outputs, log_derivative = rational_quadratic_spline(
            transformed, widths, heights, derivatives, inverse=inverse, tail_bound=self.tail_bound
        )
        return outputs, sum_except_batch(log_derivative)

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        kept, transformed = inputs[:, : self.kept_channels], inputs[:, self.kept_channels :]
        outputs, logabsdet = self._spline(kept, transformed, inverse=False)
        return self._merge(kept, outputs), logabsdet

    def inverse(self, outputs: Tensor) -> Tensor:
        kept, transformed = outputs[:, : self.kept_channels], outputs[:, self.kept_channels :]
        inputs, _ = self._spline(kept, transformed, inverse=True)
        return self._merge(kept, inputs)

    @staticmethod
    def _merge(kept: Tensor, transformed: Tensor) -> Tensor:
        return torch.cat([kept, transformed], dim=1)


@dataclass
class NsfConfig:
    """Hyperparameters that rebuild a neural spline flow."""

    input_shape: tuple[int, int, int] = (1, 28, 28)
    levels: int = 3
    steps_per_level: int = 4
    hidden_channels: int = 64
    bins: int = 8
    tail_bound: float = 4.0
    logit_alpha: float = 0.05


def build_nsf(config: NsfConfig | dict) -> Flow:
    """Neural spline flow on `u in [0, 1]^{C x H x W}`: logit, then multi-scale RQ-spline couplings."""
    if isinstance(config, dict):
        config = NsfConfig(**{**config, "input_shape": tuple(config.get("input_shape", (1, 28, 28)))})
    multiscale = GlowMultiscale(
        image_shape(config.input_shape),
        config.levels,
        config.steps_per_level,
        lambda channels: RationalQuadraticCoupling(channels, config.hidden_channels, config.bins, config.tail_bound),
    )
    flow = Flow(CompositeTransform([LogitTransform(config.logit_alpha), multiscale]), tuple(config.input_shape))
    flow.config = asdict(config)
    return flow
