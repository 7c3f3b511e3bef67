"""The one transform contract shared by every flow, a composite chain, and `Flow` = base + chain.

Convention (as in nflows / zuko, Papamakarios et al. 2021 "Normalizing Flows for Probabilistic
Modeling and Inference"): a transform maps data `x -> (z, logabsdet)` where `logabsdet` has shape
`(N,)` and equals `log |det dz/dx|` per example; `inverse(z) -> x`. Works for images `(N, C, H, W)`
and vectors `(N, D)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol, cast, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class MultiScale(Protocol):
    """A transform (or chain) that factors out latents at several scales and reports their log-densities."""

    def forward_with_levels(self, inputs: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """`x -> (z, logabsdet (N,), levels)`, `levels` a list of per-scale `(N,)` latent log-densities."""
        ...


@runtime_checkable
class FrozenInverse(Protocol):
    """A layer that precomputes what ONNX cannot express (for example W^-1 of an invertible 1x1 convolution) before export."""

    def freeze_inverse(self) -> None: ...


@runtime_checkable
class ExportPreparable(Protocol):
    """A module that settles its export-time state (for example converged spectral norms) before export."""

    def prepare_for_export(self) -> None: ...


@runtime_checkable
class ResidualTransform(Protocol):
    """`y = x + g(x)`: a residual block whose output alone (without its log-det) is one call of `residual`."""

    def weights(self) -> tuple[Tensor, ...]: ...

    def residual(self, inputs: Tensor, weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """`(g(x), *state)` for inputs `(N, ...)`."""
        ...


@runtime_checkable
class InjectiveFlow(Protocol):
    """An injective (rectangular) flow: a density on a `latent_dimension`-dimensional manifold, trained and evaluated by
    its own objective instead of bits/dim (`oodserve.models.flows.rectangular`)."""

    latent_dimension: int

    def manifold_outputs(self, unit: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(log p(x_hat) `(N,)`, squared distance to the manifold `(N,)`, coordinates `(N, d)`) for pixels in [0, 1]."""
        ...

    def training_loss(self, unit: Tensor) -> Tensor: ...

    def evaluation_metrics(self, pixels: Tensor, to_unit: Callable[[Tensor], Tensor], batch_size: int = 250) -> dict[str, float]: ...


class Transform(nn.Module):
    """A bijection with a tractable log-Jacobian-determinant.

    Subclasses implement `forward(x) -> (z, logabsdet (N,))` and `inverse(z) -> x`. Optional capabilities are the
    protocols above: `MultiScale` (per-level latent log-densities), `FrozenInverse` and `ExportPreparable` (export
    preparation), `ResidualTransform` (output without the log-det).
    """

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def inverse(self, outputs: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError


@contextmanager
def evaluation_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`with evaluation_mode(flow):` runs the block with `module` in eval mode and restores its mode after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def sum_except_batch(values: Tensor) -> Tensor:
    """Sum every dimension but the first: `(N, ...) -> (N,)`."""
    return values.reshape(values.shape[0], -1).sum(dim=1)


class CompositeTransform(Transform):
    """Chain `t_K o ... o t_1`; the log-determinants add up."""

    def __init__(self, transforms: list[Transform]) -> None:
        super().__init__()
        self.transforms = nn.ModuleList(transforms)

    @property
    def members(self) -> list[Transform]:
        """The chained transforms, in order (the ModuleList registers them; this types them)."""
        return [cast(Transform, transform) for transform in self.transforms]

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        outputs, total_logabsdet, _ = self.forward_with_levels(inputs)
        return outputs, total_logabsdet

    def forward_with_levels(self, inputs: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Like `forward`, also collecting the per-level log-densities of multi-scale members."""
        total_logabsdet = torch.zeros(inputs.shape[0], dtype=inputs.dtype, device=inputs.device)
        levels: list[Tensor] = []
        outputs = inputs
        for transform in self.members:
            if isinstance(transform, MultiScale):
                outputs, logabsdet, member_levels = transform.forward_with_levels(outputs)
                levels.extend(member_levels)
            else:
                outputs, logabsdet = transform(outputs)
            total_logabsdet = total_logabsdet + logabsdet
        return outputs, total_logabsdet, levels

    def inverse(self, outputs: Tensor) -> Tensor:
        inputs = outputs
        for transform in reversed(self.members):
            inputs = transform.inverse(inputs)
        return inputs


class Flatten(Transform):
    """Reshape `(N, *event_shape) -> (N, D)`; volume preserving."""

    def __init__(self, event_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.event_shape = tuple(event_shape)

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        zeros = torch.zeros(inputs.shape[0], dtype=inputs.dtype, device=inputs.device)
        return inputs.reshape(inputs.shape[0], -1), zeros

    def inverse(self, outputs: Tensor) -> Tensor:
        return outputs.reshape((outputs.shape[0], *self.event_shape))


def standard_normal_log_prob(z: Tensor) -> Tensor:
    """log N(z; 0, I) summed over all non-batch dims: `(N, ...) -> (N,)`."""
    return sum_except_batch(-0.5 * z * z) - 0.5 * math.log(2 * math.pi) * z[0].numel()


def gaussian_log_prob(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(z; mean, diag(exp(log_std))^2) summed over non-batch dims: `(N, ...) -> (N,)`."""
    standardized = (z - mean) * torch.exp(-log_std)
    return sum_except_batch(-0.5 * standardized * standardized - log_std - 0.5 * math.log(2 * math.pi))


class Flow(nn.Module):
    """A density `p(x) = N(f(x); 0, I) |det df/dx|` with `f` a `Transform` whose output is `(N, D)`.

    `event_shape` is the shape of one input (e.g. `(1, 28, 28)` or `(D,)`); `f` must map it to a flat
    latent of `D = prod(event_shape)` dims. For images, the inputs are the continuous values
    `u in [0, 1]^D` (see `preprocessing.py`): `log_prob` is the log density of `u` in nats.
    """

    config: dict[str, Any]
    """The family's config (as stored in a checkpoint); set by the family's builder."""
    family: str
    """The family name (`oodserve.models.flows.zoo`); set by the builder."""

    def __init__(self, transform: Transform, event_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.transform = transform
        self.event_shape = tuple(event_shape)
        self.dimension = int(math.prod(self.event_shape))
        self.classifier: nn.Module | None = None
        """A hybrid flow's head on the latent, `(N, D) -> logits (N, K)` (`oodserve.models.flows.hybrid`); None for a pure density."""

    def latent_log_prob_with_levels(self, inputs: Tensor) -> tuple[Tensor, Tensor, list[Tensor]]:
        """`(N, *event_shape) -> (latent z (N, D), log_prob (N,), levels)`; `levels` are per-scale latent log-densities."""
        if isinstance(self.transform, MultiScale):
            latent, logabsdet, levels = self.transform.forward_with_levels(inputs)
        else:
            latent, logabsdet = self.transform(inputs)
            levels = []
        return latent, standard_normal_log_prob(latent) + logabsdet, levels

    def log_prob_with_levels(self, inputs: Tensor) -> tuple[Tensor, list[Tensor]]:
        """`(N, *event_shape) -> (log_prob (N,), levels)`; `levels` are per-scale latent log-densities."""
        _, log_prob, levels = self.latent_log_prob_with_levels(inputs)
        return log_prob, levels

    def log_prob(self, inputs: Tensor) -> Tensor:
        """Log density in nats, `(N, *event_shape) -> (N,)`."""
        return self.log_prob_with_levels(inputs)[0]

    def sample_from_noise(self, noise: Tensor) -> Tensor:
        """Map standard-normal latents `(N, D)` to samples `(N, *event_shape)` by the inverse."""
        return self.transform.inverse(noise)

    def sample(self, count: int, temperature: float = 1.0) -> Tensor:
        """Draw `count` samples; `temperature` scales the latent standard deviation."""
        reference = next(self.parameters())
        noise = torch.randn(count, self.dimension, dtype=reference.dtype, device=reference.device)
        return self.sample_from_noise(noise * temperature)
