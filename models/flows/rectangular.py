"""Rectangular (injective) flows: a density on a learned d-dimensional manifold in R^D (Caterini et al. 2021,
"Rectangular flows for manifold learning").

Generative map `g: R^d -> R^D`, `g = s o h^-1 o pad o f^-1` applied to `z ~ N(0, I_d)`:
- `f`: a bijective coupling flow on R^d (`oodserve.models.flows.tabular`, affine couplings);
- `pad(u) = [u, 0]`: the injective padding R^d -> R^D;
- `h`: a bijective flow on R^D in logit space: a PCA rotation (fixed, from the first training batch, so the
  manifold starts as the principal subspace), then additive couplings with MLP conditioners;
- `s`: the inverse logit, back to pixel intensities in [0, 1].
Its left inverse `g^+(x) = first d coordinates of h(logit(x))` projects any input onto the manifold, at
`x_hat = g(g^+(x))`.

The density on the manifold at the projection (Caterini eq. 3), with `u = g^+(x)` and `J = d x_hat / d u` (D x d):

    log p(x_hat) = log p_f(u) - 1/2 log det(J^T J).

J is computed exactly by forward-mode tangent propagation of the d basis vectors through the decoder, with
every Jacobian-vector product written out (the "exact" estimator of the paper, affordable for small d), and
log det(J^T J) by an unrolled Cholesky factorisation: the same arithmetic trains by autograd and exports to
ONNX (no autograd, Det or Cholesky op in the graph). Training minimises the negative log density plus
`beta * ||x - x_hat||^2` (the reconstruction term that keeps data on the manifold), per ambient dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oodserve.models.flows.base import CompositeTransform, evaluation_mode
from oodserve.models.flows.preprocessing import PIXEL_LEVELS
from oodserve.models.flows.tabular import ElementwiseAffine, TabularFlowConfig, build_tabular_flow, coupling_masks


def silu_derivative(preactivation: Tensor) -> Tensor:
    """d SiLU(a) / da = sigma(a) (1 + a (1 - sigma(a)))."""
    sigmoid = torch.sigmoid(preactivation)
    return sigmoid * (1.0 + preactivation * (1.0 - sigmoid))


def cholesky_log_det(matrix: Tensor, floor: float = 1e-30) -> Tensor:
    """log det of symmetric positive-definite matrices `(N, d, d) -> (N,)` by an unrolled Cholesky
    factorisation (column by column: log det = sum of the log pivots). Pivots are floored at `floor`."""
    size = matrix.shape[-1]
    rows = torch.arange(size, device=matrix.device)
    columns: list[Tensor] = []
    log_det = torch.zeros(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    for index in range(size):
        column = matrix[:, :, index]
        if columns:
            factor = torch.stack(columns, dim=2)  # (N, d, index): the columns found so far
            column = column - (factor @ factor[:, index, :].unsqueeze(-1)).squeeze(-1)
        pivot = torch.clamp(column[:, index], min=floor)
        log_det = log_det + torch.log(pivot)
        below = (rows >= index).to(matrix.dtype)
        columns.append(column * below / torch.sqrt(pivot).unsqueeze(1))
    return log_det


class TangentMLP(nn.Module):
    """`(N, D) -> (N, D)` MLP (Linear, SiLU, ..., Linear; last layer zero so a coupling starts as the identity) that
    also pushes tangents `(N, k, D)` forward: its Jacobian-vector products, written out."""

    def __init__(self, features: int, hidden_features: int, hidden_layers: int) -> None:
        super().__init__()
        sizes = [features] + [hidden_features] * hidden_layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.last = nn.Linear(hidden_features, features)
        nn.init.zeros_(self.last.weight)
        nn.init.zeros_(self.last.bias)

    def forward(self, inputs: Tensor) -> Tensor:
        hidden = inputs
        for layer in self.hidden:
            hidden = F.silu(layer(hidden))
        return self.last(hidden)

    def with_tangents(self, inputs: Tensor, tangents: Tensor) -> tuple[Tensor, Tensor]:
        """(outputs (N, D), J tangents (N, k, D)) for inputs (N, D) and tangents (N, k, D)."""
        hidden, hidden_tangents = inputs, tangents
        for layer in self.hidden:
            linear = cast(nn.Linear, layer)
            preactivation = linear(hidden)
            hidden_tangents = silu_derivative(preactivation).unsqueeze(1) * (hidden_tangents @ linear.weight.T)
            hidden = F.silu(preactivation)
        return self.last(hidden), hidden_tangents @ self.last.weight.T


class AdditiveCouplingWithTangents(nn.Module):
    """`y = x + (1 - m) * t(m * x)` on `(N, D)` (NICE, Dinh et al. 2015; volume preserving); the inverse pushes
    tangents: `dx = dy - (1 - m) * J_t (m * dy)`."""

    mask: Tensor

    def __init__(self, mask: Tensor, hidden_features: int, hidden_layers: int) -> None:
        super().__init__()
        self.register_buffer("mask", mask.to(torch.get_default_dtype()))
        self.shift = TangentMLP(int(mask.numel()), hidden_features, hidden_layers)

    def encode(self, inputs: Tensor) -> Tensor:
        return inputs + (1.0 - self.mask) * self.shift(inputs * self.mask)

    def decode(self, outputs: Tensor, tangents: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        if tangents is None:
            return outputs - (1.0 - self.mask) * self.shift(outputs * self.mask), None
        shift, shift_tangents = self.shift.with_tangents(outputs * self.mask, tangents * self.mask)
        return outputs - (1.0 - self.mask) * shift, tangents - (1.0 - self.mask) * shift_tangents


@dataclass
class RectangularConfig:
    """Hyperparameters that rebuild a rectangular flow."""

    input_shape: tuple[int, int, int] = (1, 28, 28)
    manifold_dimension: int = 32
    couplings: int = 4
    hidden_features: int = 512
    hidden_layers: int = 2
    latent_couplings: int = 6
    latent_hidden_features: int = 128
    reconstruction_weight: float = 100.0
    """beta of `beta * ||x - x_hat||^2` (pixels in [0, 1]); a Gaussian off-manifold model of sd 1 / sqrt(2 beta)."""
    logit_alpha: float = 0.05


class RectangularFlow(nn.Module):
    """The injective flow of the module docstring. Inputs `(N, C, H, W)` pixel intensities in [0, 1]."""

    pca_mean: Tensor
    pca_rotation: Tensor
    initialized: Tensor
    family: str

    def __init__(self, config: RectangularConfig) -> None:
        super().__init__()
        self.config = asdict(config)
        self.event_shape = tuple(config.input_shape)
        self.dimension = int(math.prod(self.event_shape))
        self.latent_dimension = config.manifold_dimension
        if not 1 <= config.manifold_dimension < self.dimension:
            raise ValueError(f"manifold_dimension must be in [1, {self.dimension}), got {config.manifold_dimension}")
        self.logit_alpha = config.logit_alpha
        self.reconstruction_weight = config.reconstruction_weight
        self.classifier: nn.Module | None = None
        self.register_buffer("pca_mean", torch.zeros(self.dimension))
        self.register_buffer("pca_rotation", torch.eye(self.dimension))
        self.register_buffer("initialized", torch.tensor(False))
        masks = coupling_masks(self.dimension, config.couplings)
        self.couplings = nn.ModuleList(AdditiveCouplingWithTangents(mask, config.hidden_features, config.hidden_layers) for mask in masks)
        self.latent_flow = build_tabular_flow(TabularFlowConfig(features=config.manifold_dimension, couplings=config.latent_couplings,
                                                                hidden_features=config.latent_hidden_features, hidden_layers=2))

    @property
    def coupling_chain(self) -> list[AdditiveCouplingWithTangents]:
        """The couplings in order (the ModuleList registers them; this types them)."""
        return [cast(AdditiveCouplingWithTangents, coupling) for coupling in self.couplings]

    # ---- the two directions -------------------------------------------------------------------------------
    def _to_logit(self, unit: Tensor) -> Tensor:
        scaled = self.logit_alpha + (1.0 - 2.0 * self.logit_alpha) * unit.reshape(unit.shape[0], -1)
        return torch.log(scaled) - torch.log1p(-scaled)

    def encode(self, unit: Tensor) -> Tensor:
        """`g^+`: pixels in [0, 1] `(N, C, H, W)` -> manifold coordinates u `(N, d)`."""
        hidden = (self._to_logit(unit) - self.pca_mean) @ self.pca_rotation
        for coupling in self.coupling_chain:
            hidden = coupling.encode(hidden)
        return hidden[:, : self.latent_dimension]

    def decode(self, coordinates: Tensor, with_jacobian: bool = False) -> tuple[Tensor, Tensor | None]:
        """`g` without the latent flow: u `(N, d)` -> (x_hat `(N, D)` in [0, 1], J^T `(N, d, D)` = d x_hat / d u
        by tangent propagation of the d basis vectors, or None)."""
        count, size = coordinates.shape
        hidden = torch.cat([coordinates, coordinates.new_zeros(count, self.dimension - size)], dim=1)
        tangents = None
        if with_jacobian:
            basis = torch.eye(size, self.dimension, dtype=coordinates.dtype, device=coordinates.device)
            tangents = basis.unsqueeze(0).expand(count, size, self.dimension)
        for coupling in reversed(self.coupling_chain):
            hidden, tangents = coupling.decode(hidden, tangents)
        logit = hidden @ self.pca_rotation.T + self.pca_mean
        sigmoid = torch.sigmoid(logit)
        unit = (sigmoid - self.logit_alpha) / (1.0 - 2.0 * self.logit_alpha)
        if tangents is not None:
            tangents = (sigmoid * (1.0 - sigmoid) / (1.0 - 2.0 * self.logit_alpha)).unsqueeze(1) * (tangents @ self.pca_rotation.T)
        return unit, tangents

    # ---- densities ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def initialize(self, unit: Tensor) -> None:
        """PCA of a batch `(N, C, H, W)` in logit space -> the rotation (components by decreasing variance), then the
        latent flow's elementwise affine standardises the manifold coordinates."""
        logit = self._to_logit(unit).double()
        mean = logit.mean(dim=0)
        covariance = torch.cov((logit - mean).T)
        _, vectors = torch.linalg.eigh(covariance)
        self.pca_mean.copy_(mean.to(self.pca_mean.dtype))
        self.pca_rotation.copy_(vectors.flip(1).to(self.pca_rotation.dtype))
        coordinates = self.encode(unit)
        standardise = cast(CompositeTransform, self.latent_flow.transform).members[0]
        assert isinstance(standardise, ElementwiseAffine)
        scale = coordinates.std(dim=0).clamp(min=1e-3)
        standardise.log_scale.copy_(-torch.log(scale))
        standardise.shift.copy_(-coordinates.mean(dim=0) / scale)
        self.initialized.fill_(True)

    def manifold_outputs(self, unit: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(log p(x_hat) `(N,)` nats on the manifold, squared distance ||x - x_hat||^2 `(N,)` in [0, 1] units,
        manifold coordinates u `(N, d)`) for pixels in [0, 1] `(N, C, H, W)`."""
        if self.training and not bool(self.initialized):
            self.initialize(unit)
        coordinates = self.encode(unit)
        projection, jacobian_t = self.decode(coordinates, with_jacobian=True)
        assert jacobian_t is not None
        gram = jacobian_t @ jacobian_t.transpose(1, 2)
        log_density = self.latent_flow.log_prob(coordinates) - 0.5 * cholesky_log_det(gram)
        squared_distance = ((unit.reshape(unit.shape[0], -1) - projection) ** 2).sum(dim=1)
        return log_density, squared_distance, coordinates

    def log_prob(self, unit: Tensor) -> Tensor:
        """On-manifold log density at the projection, `(N, C, H, W) -> (N,)` nats."""
        return self.manifold_outputs(unit)[0]

    def training_loss(self, unit: Tensor) -> Tensor:
        """Mean over the batch of (-log p(x_hat) + beta ||x - x_hat||^2) / D (Caterini et al. 2021, eq. 7)."""
        log_density, squared_distance, _ = self.manifold_outputs(unit)
        return ((-log_density + self.reconstruction_weight * squared_distance) / self.dimension).mean()

    def sample_from_noise(self, noise: Tensor) -> Tensor:
        """z `(N, d)` standard normal -> samples `(N, C, H, W)` in [0, 1] on the manifold."""
        unit, _ = self.decode(self.latent_flow.sample_from_noise(noise))
        return unit.reshape(noise.shape[0], *self.event_shape)

    @torch.no_grad()
    def evaluation_metrics(self, pixels: Tensor, to_unit: Callable[[Tensor], Tensor], batch_size: int = 250) -> dict[str, float]:
        """Means over 8-bit images `(N, C, H, W)` (mapped by `to_unit`) in eval mode: on-manifold bits per manifold
        dimension in 8-bit units (-log p / (d ln 2) + log2 256), reconstruction RMSE and distance in pixel levels."""
        log_density, squared = [], []
        with evaluation_mode(self):
            for start in range(0, pixels.shape[0], batch_size):
                density, distance, _ = self.manifold_outputs(to_unit(pixels[start : start + batch_size]))
                log_density.append(density)
                squared.append(distance)
        density, distance = torch.cat(log_density), torch.cat(squared)
        levels = float(PIXEL_LEVELS - 1)
        return {
            "manifold_bits_per_dim": float((-density / (self.latent_dimension * math.log(2.0))).mean() + math.log2(PIXEL_LEVELS)),
            "reconstruction_rmse_pixels": float(torch.sqrt(distance / self.dimension).mean()) * levels,
            "distance_to_manifold_pixels": float(torch.sqrt(distance).mean()) * levels,
        }


def build_rectangular(config: RectangularConfig | dict) -> RectangularFlow:
    """A rectangular flow from its config (dict as stored in a checkpoint)."""
    if isinstance(config, dict):
        config = RectangularConfig(**{**config, "input_shape": tuple(config.get("input_shape", (1, 28, 28)))})
    flow = RectangularFlow(config)
    flow.family = "rectangular"
    return flow
