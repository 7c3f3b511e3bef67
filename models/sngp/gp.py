"""Random-Fourier-feature Gaussian-process output layer with a Laplace posterior (Liu et al. 2020, Sec. 3.1).

`phi(h) = sqrt(2 / M) cos(W LayerNorm(h) + b)` with fixed `W ~ N(0, 1 / lengthscale^2)` and
`b ~ U(0, 2 pi)` (Rahimi & Recht 2007), logits `phi beta`, precision
`P = ridge * I + sum_i phi_i phi_i^T` summed exactly over the last training epoch (Eq. 9, as in
edward2's momentum-free update), `Sigma = P^-1`, per-sample variance `ridge * phi^T Sigma phi`
and mean-field logits `logits / sqrt(1 + lambda * var)`, lambda = pi / 8 (Lu et al. 2020).
"""

from __future__ import annotations

import math

import torch
from torch import nn

MEAN_FIELD_FACTOR = math.pi / 8.0


def random_fourier_features(
    normalized_inputs: torch.Tensor, frequencies: torch.Tensor, phases: torch.Tensor
) -> torch.Tensor:
    """`(N, D) -> (N, M)`: `sqrt(2 / M) cos(h W^T + b)` with `W` (M, D) and `b` (M,)."""
    num_features = frequencies.shape[0]
    return math.sqrt(2.0 / num_features) * torch.cos(normalized_inputs @ frequencies.t() + phases)


def predictive_variance(features: torch.Tensor, covariance: torch.Tensor, ridge: float) -> torch.Tensor:
    """`(N, M), (M, M) -> (N,)`: `ridge * phi_i^T Sigma phi_i` row by row (never an N x N matrix)."""
    return ridge * ((features @ covariance) * features).sum(dim=-1)


def mean_field_logits(
    logits: torch.Tensor, variance: torch.Tensor, mean_field_factor: float = MEAN_FIELD_FACTOR
) -> torch.Tensor:
    """`(N, K), (N,) -> (N, K)`: `logits / sqrt(1 + lambda * var)` (mean-field approximation)."""
    return logits / torch.sqrt(1.0 + mean_field_factor * variance).unsqueeze(-1)


class RandomFeatureGaussianProcess(nn.Module):
    """GP output layer. In training mode every forward adds `Phi^T Phi` of its batch to the precision."""

    precision: torch.Tensor
    covariance: torch.Tensor
    frequencies: torch.Tensor
    phases: torch.Tensor

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        num_random_features: int = 1024,
        ridge: float = 1.0,
        lengthscale: float = 1.0,
        mean_field_factor: float = MEAN_FIELD_FACTOR,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.num_classes = num_classes
        self.num_random_features = num_random_features
        self.ridge = float(ridge)
        self.lengthscale = float(lengthscale)
        self.mean_field_factor = float(mean_field_factor)
        self.input_norm = nn.LayerNorm(in_features)
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer(
            "frequencies", torch.randn(num_random_features, in_features, generator=generator) / lengthscale
        )
        self.register_buffer("phases", 2.0 * math.pi * torch.rand(num_random_features, generator=generator))
        self.output = nn.Linear(num_random_features, num_classes, bias=False)
        self.register_buffer("precision", self.ridge * torch.eye(num_random_features, dtype=torch.float64))
        self.register_buffer("covariance", torch.eye(num_random_features) / self.ridge)

    def random_features(self, hidden: torch.Tensor) -> torch.Tensor:
        """`(N, D) -> (N, M)` random features of the layer-normalised input."""
        return random_fourier_features(self.input_norm(hidden), self.frequencies, self.phases)

    def reset_precision(self) -> None:
        """Start a new exact sum: `P = ridge * I` (call at the start of every epoch)."""
        self.precision.copy_(self.ridge * torch.eye(self.num_random_features, dtype=torch.float64))

    @torch.no_grad()
    def accumulate_precision(self, features: torch.Tensor) -> None:
        """`P += Phi^T Phi` for a batch of random features `(N, M)` (float64 sum)."""
        features = features.detach().double()
        self.precision.add_(features.t() @ features)

    @torch.no_grad()
    def update_covariance(self) -> None:
        """`Sigma = P^-1` (once, after the last epoch)."""
        self.covariance.copy_(torch.linalg.inv(self.precision).float())

    def forward(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(N, D) -> (logits (N, K), variance (N,), mean-field logits (N, K))`.

        In training mode the batch's features are added to the precision; the variance is not
        needed there (the loss uses the plain logits) and is returned as zeros to save the
        `N x M x M` product.
        """
        features = self.random_features(hidden)
        logits = self.output(features)
        if self.training:
            self.accumulate_precision(features)
            return logits, torch.zeros_like(logits[:, 0]), logits
        variance = predictive_variance(features, self.covariance, self.ridge)
        return logits, variance, mean_field_logits(logits, variance, self.mean_field_factor)
