"""Small spectral-normalised residual CNN for images (N, C, H, W) and an SNGP model around it (Liu et al. 2020).

Residual blocks `x + g(x)` with spectral-normalised convolutions keep the feature map
bi-Lipschitz (distance preserving, Sec. 3.2); stage transitions are spectral-normalised strided
convolutions. Batch normalisation follows the reference wide-ResNet SNGP of uncertainty-baselines.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from oodserve.models.nn.spectral import SpectralNormConv2d, SpectralNormLinear
from oodserve.models.sngp.gp import RandomFeatureGaussianProcess

FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530


@dataclass(frozen=True)
class SNGPConfig:
    """Hyperparameters needed to rebuild the network (stored in checkpoints)."""

    widths: tuple[int, ...] = (16, 32, 64)
    blocks_per_stage: int = 1
    spectral_bound: float = 6.0
    power_iterations: int = 1
    num_classes: int = 10
    num_random_features: int = 1024
    ridge: float = 1.0
    lengthscale: float = 1.0
    image_size: int = 28
    """Image height (and width unless `image_width` is set)."""
    image_width: int = 0
    in_channels: int = 1
    pixel_mean: float = FASHION_MNIST_MEAN
    pixel_std: float = FASHION_MNIST_STD
    gp_seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def image_hw(self) -> tuple[int, int]:
        return self.image_size, self.image_width or self.image_size

    @classmethod
    def from_dict(cls, values: dict) -> SNGPConfig:
        values = dict(values)
        values["widths"] = tuple(values["widths"])
        return cls(**values)


class ResidualBlock(nn.Module):
    """`x + conv(relu(bn(conv(relu(bn(x))))))` on `(N, C, H, W)` with spectral-normalised 3x3 convs."""

    def __init__(self, channels: int, size: tuple[int, int], spectral_bound: float, power_iterations: int) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv1 = SpectralNormConv2d(
            channels, channels, 3, size, padding=1, bias=False,
            spectral_bound=spectral_bound, power_iterations=power_iterations,
        )
        self.norm2 = nn.BatchNorm2d(channels)
        self.conv2 = SpectralNormConv2d(
            channels, channels, 3, size, padding=1, bias=False,
            spectral_bound=spectral_bound, power_iterations=power_iterations,
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.conv1(F.relu(self.norm1(inputs)))
        return inputs + self.conv2(F.relu(self.norm2(hidden)))


class ResidualCNNBackbone(nn.Module):
    """`(N, C, H, W)` normalised images -> `(N, widths[-1])` pooled features."""

    def __init__(self, config: SNGPConfig) -> None:
        super().__init__()
        bound, iterations = config.spectral_bound, config.power_iterations
        size = config.image_hw
        layers: list[nn.Module] = [
            SpectralNormConv2d(config.in_channels, config.widths[0], 3, size, padding=1, bias=False,
                               spectral_bound=bound, power_iterations=iterations)
        ]
        for stage, width in enumerate(config.widths):
            if stage > 0:
                layers += [
                    nn.BatchNorm2d(config.widths[stage - 1]),
                    nn.ReLU(),
                    SpectralNormConv2d(config.widths[stage - 1], width, 3, size, stride=2, padding=1,
                                       bias=False, spectral_bound=bound, power_iterations=iterations),
                ]
                size = ((size[0] + 1) // 2, (size[1] + 1) // 2)
            layers += [ResidualBlock(width, size, bound, iterations) for _ in range(config.blocks_per_stage)]
        layers += [nn.BatchNorm2d(config.widths[-1]), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.layers = nn.Sequential(*layers)
        self.feature_dim = config.widths[-1]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.layers(images)


class SNGPClassifier(nn.Module):
    """Backbone + GP output. `forward(images in 0..1 scale normalised)` -> `(logits, variance, mean-field, features)`."""

    def __init__(self, config: SNGPConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone = ResidualCNNBackbone(config)
        self.gp = RandomFeatureGaussianProcess(
            self.backbone.feature_dim, config.num_classes, config.num_random_features,
            ridge=config.ridge, lengthscale=config.lengthscale, seed=config.gp_seed,
        )

    def normalize(self, raw_pixels: torch.Tensor) -> torch.Tensor:
        """Raw pixels `(N, C, H, W)` in 0..255 -> standardised inputs."""
        return (raw_pixels / 255.0 - self.config.pixel_mean) / self.config.pixel_std

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Standardised `(N, C, H, W)` -> logits `(N, K)`, variance `(N,)`, mean-field `(N, K)`, features `(N, F)`."""
        features = self.backbone(inputs)
        logits, variance, mean_field = self.gp(features)
        return logits, variance, mean_field, features


class ResidualMLP(nn.Module):
    """Spectral-normalised residual MLP `(N, d) -> (N, width)` used for the two-moons toy problem."""

    def __init__(self, in_features: int, width: int, depth: int, spectral_bound: float = 0.95) -> None:
        super().__init__()
        self.input_layer = nn.Linear(in_features, width)
        self.input_layer.requires_grad_(False)  # fixed random projection, as in the SNGP toy experiments
        self.hidden = nn.ModuleList(
            SpectralNormLinear(width, width, spectral_bound=spectral_bound) for _ in range(depth)
        )

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        hidden = self.input_layer(inputs)
        for layer in self.hidden:
            hidden = hidden + F.relu(layer(hidden))
        return hidden
