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

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oodserve.models.flows.attention import L2AttentionBlock
from oodserve.models.flows.base import CompositeTransform, Flatten, Flow, Transform
from oodserve.models.flows.contractive import ContractiveResidual, elu_derivative, explicit_series_log_det
from oodserve.models.flows.layers import ActNorm, Squeeze
from oodserve.models.flows.preprocessing import LogitTransform
from oodserve.models.nn.spectral import SpectralNormConv2d


class ContractiveConv2d(SpectralNormConv2d):
    """Same-size convolution (padding kernel_size // 2) whose operator norm on `(C, H, W)` inputs is softly
    bounded by `coefficient` < 1 (`oodserve.models.nn.spectral`); sigma is converged at construction, so a new
    block is contractive in eval mode too."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, input_hw: tuple[int, int],
                 coefficient: float, power_iterations: int = 1) -> None:
        super().__init__(in_channels, out_channels, kernel_size, input_hw, padding=kernel_size // 2,
                         spectral_bound=coefficient, power_iterations=power_iterations)
        assert self.bias is not None
        nn.init.zeros_(self.bias)
        self.refresh_sigma(max_iterations=50)

    @property
    def coefficient(self) -> float:
        return self.spectral_bound


class ResidualBlock(ContractiveResidual):
    """`y = x + g(x)` on `(N, C, H, W)` with a contractive `g` (see module docstring)."""

    probes: Tensor

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

    def residual(self, inputs: Tensor, weights: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """g(x) and the two pre-activations `a1, a2` (needed by the explicit JVP)."""
        first_pre = self.first(inputs, weights[0])
        second_pre = self.second(F.elu(first_pre), weights[1])
        return self.third(F.elu(second_pre), weights[2]), first_pre, second_pre

    def g(self, inputs: Tensor) -> Tensor:
        """The residual function g(x), `(N, C, H, W) -> (N, C, H, W)`, with the current weights."""
        return self.residual(inputs, self.weights())[0]

    def jacobian_vector_product(self, vectors: Tensor, first_pre: Tensor, second_pre: Tensor,
                                weights: tuple[Tensor, ...]) -> Tensor:
        """J_g v = W3 diag(ELU'(a2)) W2 diag(ELU'(a1)) W1 v, written out (no autograd), `(M, C, H, W)`."""
        hidden = elu_derivative(first_pre) * self.first.linear(vectors, weights[0])
        hidden = elu_derivative(second_pre) * self.second.linear(hidden, weights[1])
        return self.third.linear(hidden, weights[2])

    def log_det_explicit(self, inputs: Tensor, probes: Tensor, terms: int,
                         weights: tuple[Tensor, ...] | None = None) -> Tensor:
        """Inference estimator: mean over probes of sum_k (-1)^(k+1)/k v^T J^k v, explicit JVPs, `(N,)`."""
        weights = self.weights() if weights is None else weights
        _, first_pre, second_pre = self.residual(inputs, weights)
        return explicit_series_log_det(lambda vectors, tiled: self.jacobian_vector_product(vectors, tiled[0], tiled[1], weights),
                                       (first_pre, second_pre), probes, inputs.shape[0], terms)

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
