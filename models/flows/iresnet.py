"""Invertible residual networks / residual flows (Behrmann et al. 2019; Chen et al. 2019) for images.

A block is `y = x + g(x)` with `g = W3 o ELU o W2 o ELU o W1` (convolutions), each weight spectrally
normalised with a soft bound `W / max(1, sigma(W) / c)`, `c < 1`, sigma the operator norm of the
convolution on the block's input size (power iteration on conv / conv-transpose, `oodserve.models.nn.spectral`),
so Lip(g) < 1.

log det(I + J_g) = sum_k (-1)^(k+1) / k tr(J_g^k) (Behrmann eq. 6), truncated after a fixed number
of terms, traces by Hutchinson's estimator v^T J^k v:
- training: fresh Gaussian probes, J^T products by autograd (`create_graph=True`) so it is differentiable;
- inference and ONNX export: fixed probe vectors stored as buffers and the Jacobian-vector product
  written out explicitly, J v = W3 diag(ELU'(a2)) W2 diag(ELU'(a1)) W1 v (the same convolutions
  without bias), so the graph is deterministic and needs no autograd.
Both estimators give the same number for the same probes and terms (v^T J^k v either way).
The inverse is the fixed-point iteration x <- y - g(x) with a fixed number of iterations.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oodserve.models.flows.base import CompositeTransform, Flatten, Flow, Transform, sum_except_batch
from oodserve.models.flows.layers import ActNorm, Squeeze
from oodserve.models.flows.preprocessing import LogitTransform
from oodserve.models.nn.spectral import SpectralNormConv2d


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


class ContractiveConv2d(SpectralNormConv2d):
    """Same-size convolution (padding kernel_size // 2) whose operator norm on `(C, H, W)` inputs is softly
    bounded by `coefficient` < 1 (`oodserve.models.nn.spectral`); sigma is converged at construction, so a new
    block is contractive in eval mode too."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, input_hw: tuple[int, int],
                 coefficient: float, power_iterations: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, input_hw, padding=kernel_size // 2,
                         spectral_bound=coefficient, power_iterations=power_iterations)
        nn.init.zeros_(self.bias)
        self.refresh_sigma(max_iterations=50)

    @property
    def coefficient(self) -> float:
        return self.spectral_bound


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


class ResidualBlock(ContractiveResidual):
    """`y = x + g(x)` on `(N, C, H, W)` with a contractive `g` (see module docstring)."""

    def __init__(self, channels: int, hidden_channels: int, input_hw: tuple[int, int], coefficient: float,
                 training_terms: int, inference_terms: int, inference_probes: int, inverse_iterations: int,
                 probe_seed: int) -> None:
        super().__init__()
        self.first = ContractiveConv2d(channels, hidden_channels, 3, input_hw, coefficient)
        self.second = ContractiveConv2d(hidden_channels, hidden_channels, 1, input_hw, coefficient)
        self.third = ContractiveConv2d(hidden_channels, channels, 3, input_hw, coefficient)
        self.training_terms = training_terms
        self.inference_terms = inference_terms
        self.inverse_iterations = inverse_iterations
        generator = torch.Generator().manual_seed(probe_seed)
        self.register_buffer("probes", torch.randn(inference_probes, channels, *input_hw, generator=generator))

    def weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """The three normalised weights (one power-iteration step each first when training)."""
        return self.first.normalized_weight(), self.second.normalized_weight(), self.third.normalized_weight()

    def residual(self, inputs: Tensor, weights: tuple[Tensor, Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """g(x) and the two pre-activations `a1, a2` (needed by the explicit JVP)."""
        first_pre = self.first(inputs, weights[0])
        second_pre = self.second(F.elu(first_pre), weights[1])
        return self.third(F.elu(second_pre), weights[2]), first_pre, second_pre

    def g(self, inputs: Tensor) -> Tensor:
        """The residual function g(x), `(N, C, H, W) -> (N, C, H, W)`, with the current weights."""
        return self.residual(inputs, self.weights())[0]

    def jacobian_vector_product(self, vectors: Tensor, first_pre: Tensor, second_pre: Tensor,
                                weights: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        """J_g v = W3 diag(ELU'(a2)) W2 diag(ELU'(a1)) W1 v, written out (no autograd), `(M, C, H, W)`."""
        hidden = elu_derivative(first_pre) * self.first.linear(vectors, weights[0])
        hidden = elu_derivative(second_pre) * self.second.linear(hidden, weights[1])
        return self.third.linear(hidden, weights[2])

    def log_det_explicit(self, inputs: Tensor, probes: Tensor, terms: int,
                         weights: tuple[Tensor, ...] | None = None) -> Tensor:
        """Inference estimator: mean over probes of sum_k (-1)^(k+1)/k v^T J^k v, explicit JVPs, `(N,)`."""
        weights = self.weights() if weights is None else weights
        _, *state = self.residual(inputs, weights)
        return explicit_series_log_det(lambda vectors, tiled: self.jacobian_vector_product(vectors, *tiled, weights),
                                       tuple(state), probes, inputs.shape[0], terms)

@dataclass
class IResNetConfig:
    """Hyperparameters that rebuild an i-ResNet / residual flow."""

    input_shape: tuple[int, int, int] = (1, 28, 28)
    blocks_per_scale: int = 4
    scales: int = 2
    hidden_channels: int = 64
    coefficient: float = 0.9
    training_terms: int = 5
    inference_terms: int = 8
    inference_probes: int = 2
    inverse_iterations: int = 40
    logit_alpha: float = 0.05
    attention: str = "none"
    """"l2": end every scale with an attentive contractive block (`oodserve.models.flows.attention`, L2 self-attention)."""
    attention_heads: int = 1


def build_iresnet(config: IResNetConfig | dict) -> Flow:
    """Logit, then per scale: squeeze and `blocks_per_scale` x (actnorm, residual block), with attention "l2" one
    (actnorm, attentive block) more; then flatten."""
    if isinstance(config, dict):
        config = IResNetConfig(**{**config, "input_shape": tuple(config.get("input_shape", (1, 28, 28)))})
    channels, height, width = config.input_shape
    transforms: list[Transform] = [LogitTransform(config.logit_alpha)]
    block_index = 0
    for _ in range(config.scales):
        if height % 2 == 0 and width % 2 == 0:
            transforms.append(Squeeze())
            channels, height, width = channels * 4, height // 2, width // 2
        for _ in range(config.blocks_per_scale):
            transforms.append(ActNorm(channels))
            transforms.append(
                ResidualBlock(channels, config.hidden_channels, (height, width), config.coefficient,
                              config.training_terms, config.inference_terms, config.inference_probes,
                              config.inverse_iterations, probe_seed=block_index)
            )
            block_index += 1
        if config.attention == "l2":
            from oodserve.models.flows.attention import L2AttentionBlock

            transforms.append(ActNorm(channels))
            transforms.append(
                L2AttentionBlock(channels, (height, width), config.attention_heads, config.coefficient, config.training_terms,
                                 config.inference_terms, config.inference_probes, config.inverse_iterations, probe_seed=block_index)
            )
            block_index += 1
        elif config.attention != "none":
            raise ValueError(f"attention must be none or l2, got {config.attention!r}")
    transforms.append(Flatten((channels, height, width)))
    flow = Flow(CompositeTransform(transforms), tuple(config.input_shape))
    flow.config = asdict(config)
    return flow
