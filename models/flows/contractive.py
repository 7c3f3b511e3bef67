"""The residual-flow core every contractive block shares (`oodserve.models.flows.iresnet`'s convolutional blocks,
`oodserve.models.flows.attention`'s attentive block): `y = x + g(x)` with Lip(g) < 1 (Behrmann et al. 2019; Chen et
al. 2019).

log det(I + J_g) = sum_k (-1)^(k+1) / k tr(J_g^k) (Behrmann eq. 6), truncated after a fixed number of terms, traces by
Hutchinson's estimator v^T J^k v: autograd vector-Jacobian products while training (differentiable), an explicit
Jacobian-vector product with stored probes at inference and in ONNX; the inverse is the fixed-point iteration
x <- y - g(x).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from oodserve.models.flows.base import Transform, sum_except_batch


def elu_derivative(preactivation: Tensor) -> Tensor:
    """d ELU(a) / da = 1 for a > 0, exp(a) otherwise (Lipschitz constant 1)."""
    return torch.where(preactivation > 0, torch.ones_like(preactivation), torch.exp(torch.clamp(preactivation, max=0.0)))


def explicit_series_log_det(jvp: Callable[[Tensor, tuple[Tensor, ...]], Tensor], state: tuple[Tensor, ...], probes: Tensor,
                            batch: int, terms: int) -> Tensor:
    """log det(I + J) ~ mean over the P probes v of sum_{k<=terms} (-1)^(k+1)/k v^T J^k v (Behrmann eq. 6 with
    Hutchinson traces), every J product by `jvp(vectors (P*N, ...), state tiled P times along the batch)`, `(N,)`.
    `state` holds the residual's per-input tensors (leading axis N) that its JVP needs."""
    probe_count = probes.shape[0]
    vectors = probes.unsqueeze(1).expand(probe_count, batch, *probes.shape[1:]).reshape(probe_count * batch, *probes.shape[1:])
    tiled = tuple(tensor.repeat(probe_count, *([1] * (tensor.dim() - 1))) for tensor in state)
    power = vectors
    total = torch.zeros(probe_count * batch, dtype=probes.dtype, device=probes.device)
    for term in range(1, terms + 1):
        power = jvp(power, tiled)
        total = total + ((-1.0) ** (term + 1) / term) * sum_except_batch(power * vectors)
    return total.reshape(probe_count, batch).mean(dim=0)


def autograd_series_log_det(residual: Tensor, inputs: Tensor, probes: Tensor, terms: int) -> Tensor:
    """The same series with v^T J^k by autograd VJPs of `residual` = g(inputs) (`create_graph=True`: differentiable)."""
    total = torch.zeros(inputs.shape[0], dtype=inputs.dtype, device=inputs.device)
    for probe in probes:
        vector = probe.unsqueeze(0).expand_as(inputs)
        power = vector
        for term in range(1, terms + 1):
            (power,) = torch.autograd.grad(residual, inputs, power, create_graph=True, retain_graph=True)
            total = total + ((-1.0) ** (term + 1) / term) * sum_except_batch(power * vector)
    return total / probes.shape[0]


def exact_trace_probes(probes: Tensor) -> Tensor:
    """sqrt(D) times the D basis vectors of the probes' shape: with them Hutchinson's estimator is the exact trace."""
    shape = probes.shape[1:]
    dimension = int(math.prod(shape))
    basis = torch.eye(dimension, dtype=probes.dtype, device=probes.device) * math.sqrt(dimension)
    return basis.reshape(dimension, *shape)


class ContractiveResidual(Transform):
    """`y = x + g(x)` with Lip(g) < 1: the estimators, forward, inverse and exact-trace switch every residual block
    shares. A subclass gives `weights()`, `residual(inputs, weights) -> (g(x), *state)`, `log_det_explicit` and the
    attributes `probes`, `training_terms`, `inference_terms`, `inverse_iterations`."""

    probes: Tensor
    training_terms: int
    inference_terms: int
    inverse_iterations: int

    def weights(self) -> tuple[Tensor, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def residual(self, inputs: Tensor, weights: tuple[Tensor, ...]) -> tuple[Tensor, ...]:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_det_explicit(self, inputs: Tensor, probes: Tensor, terms: int,
                         weights: tuple[Tensor, ...] | None = None) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_det_autograd(self, inputs: Tensor, probes: Tensor, terms: int,
                         weights: tuple[Tensor, ...] | None = None) -> Tensor:
        """Training estimator (Behrmann 2019, alg. 1): same series, v^T J^k by autograd VJPs with
        `create_graph=True` so the estimate is differentiable. `inputs` must require grad. `(N,)`."""
        weights = self.weights() if weights is None else weights
        return autograd_series_log_det(self.residual(inputs, weights)[0], inputs, probes, terms)

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        weights = self.weights()
        if self.training and torch.is_grad_enabled():
            if not inputs.requires_grad:
                inputs = inputs.clone().requires_grad_(True)
            fresh_probe = torch.randn(1, *inputs.shape[1:], dtype=inputs.dtype, device=inputs.device)
            logabsdet = self.log_det_autograd(inputs, fresh_probe, self.training_terms, weights)
        else:
            logabsdet = self.log_det_explicit(inputs, self.probes.to(inputs.dtype), self.inference_terms, weights)
        return inputs + self.residual(inputs, weights)[0], logabsdet

    def inverse(self, outputs: Tensor) -> Tensor:
        weights = self.weights()
        inputs = outputs
        for _ in range(self.inverse_iterations):
            inputs = outputs - self.residual(inputs, weights)[0]
        return inputs

    def use_exact_trace(self) -> None:
        """Replace the probes by sqrt(D) * basis vectors, so the estimator is the exact truncated series."""
        self.probes = exact_trace_probes(self.probes)
