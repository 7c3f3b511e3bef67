"""Attentive contractive residual block: `y = x + g(x)` with `g` a multi-head L2 self-attention over the H*W
positions of an `(N, C, H, W)` input, scaled so that Lip(g) <= coefficient < 1 provably (an invertible,
residual-flow block; the attentive contractive flow idea).

L2 self-attention (Kim, Papamakarios and Mnih 2021, "The Lipschitz constant of self-attention"): with tokens
X (T x C) and tied query/key weights W_Q^h (C x d) per head h,

    P^h_ij = softmax_j(-||x_i W_Q^h - x_j W_Q^h||^2 / sqrt(d)),   f^h(X) = P^h X A^h,   A^h = W_Q^h W_Q^h^T / sqrt(d),
    F(X) = [f^1(X) W_V^1, ..., f^H(X) W_V^H] W_O,

is Lipschitz (dot-product attention is not), with (their Theorem 3.2, 2-norm)

    Lip_2(F) <= sqrt(T) / sqrt(d) * (4 W0((T - 1) / e) + 1) * sqrt(sum_h ||W_Q^h||^2 ||W_V^h||^2) * ||W_O||,

W0 the principal branch of Lambert's W. The block uses g = coefficient * F / bound with the bound computed
from exact spectral norms of the current weights, so Lip(g) <= coefficient whatever the weights.

Log-determinant and inverse as every contractive block's (`oodserve.models.flows.contractive`): the power series of
tr(J^k) with Hutchinson probes
(autograd in training, stored probes and the explicit Jacobian-vector product below at inference, so the ONNX
graph needs no autograd), and the fixed-point inverse x <- y - g(x).

Explicit JVP (q_i = x_i W_Q, L_ij the logits): dL_ij = -2 / sqrt(d) (q_i.dq_i + q_j.dq_j - dq_i.q_j - q_i.dq_j),
dP_ij = P_ij (dL_ij - sum_k P_ik dL_ik), df = dP X A + P dX A, then the same value and output maps.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from oodserve.models.flows.contractive import ContractiveResidual, explicit_series_log_det


def lambert_w0(value: float) -> float:
    """Principal branch of Lambert's W for value >= 0 (Newton's method on w e^w = value)."""
    if value < 0:
        raise ValueError(f"lambert_w0 takes value >= 0, got {value}")
    estimate = math.log1p(value)
    for _ in range(100):
        exp = math.exp(estimate)
        step = (estimate * exp - value) / (exp * (estimate + 1.0))
        estimate -= step
        if abs(step) < 1e-15:
            break
    return estimate


def l2_attention_lipschitz_factor(tokens: int, head_dim: int) -> float:
    """sqrt(T) / sqrt(d) * (4 W0((T - 1) / e) + 1): Kim et al.'s bound without the weight norms."""
    return math.sqrt(tokens) / math.sqrt(head_dim) * (4.0 * lambert_w0((tokens - 1) / math.e) + 1.0)


class L2AttentionBlock(ContractiveResidual):
    """`y = x + g(x)` on `(N, C, H, W)`, g the scaled multi-head L2 self-attention over the H*W positions."""

    probes: Tensor

    def __init__(self, channels: int, input_hw: tuple[int, int], heads: int, coefficient: float, training_terms: int,
                 inference_terms: int, inference_probes: int, inverse_iterations: int, probe_seed: int) -> None:
        super().__init__()
        if not 0.0 < coefficient < 1.0:
            raise ValueError(f"coefficient must be in (0, 1) for an invertible block, got {coefficient}")
        self.heads = heads
        self.head_dim = max(1, channels // heads)
        self.coefficient = coefficient
        self.tokens = input_hw[0] * input_hw[1]
        self.factor = l2_attention_lipschitz_factor(self.tokens, self.head_dim)
        generator = torch.Generator().manual_seed(10_000 + probe_seed)
        scale = 1.0 / math.sqrt(channels)
        self.query = nn.Parameter(torch.randn(heads, channels, self.head_dim, generator=generator) * scale)
        self.value = nn.Parameter(torch.randn(heads, channels, self.head_dim, generator=generator) * scale)
        self.output = nn.Parameter(torch.randn(heads * self.head_dim, channels, generator=generator) * scale)
        self.training_terms = training_terms
        self.inference_terms = inference_terms
        self.inverse_iterations = inverse_iterations
        probes = torch.Generator().manual_seed(probe_seed)
        self.register_buffer("probes", torch.randn(inference_probes, channels, *input_hw, generator=probes))

    def bound(self) -> Tensor:
        """Kim et al.'s bound on Lip_2 of the unscaled attention with the current weights (exact spectral norms)."""
        query_norms = torch.linalg.matrix_norm(self.query, ord=2)
        value_norms = torch.linalg.matrix_norm(self.value, ord=2)
        return self.factor * torch.sqrt(torch.sum(query_norms**2 * value_norms**2)) * torch.linalg.matrix_norm(self.output, ord=2)

    def weights(self) -> tuple[Tensor, Tensor, Tensor]:
        """(W_Q, W_V, W_O scaled by coefficient / bound): g's weights, Lip(g) <= coefficient. Outside training the
        scale is a number computed from the weights, so the exported graph holds a constant, not an SVD."""
        if self.training:
            scale: Tensor | float = self.coefficient / self.bound()
        else:
            with torch.no_grad():
                scale = float(self.coefficient / self.bound())
        return self.query, self.value, self.output * scale

    @staticmethod
    def _tokens(images: Tensor) -> Tensor:
        return images.flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, C)

    def _project(self, tokens: Tensor, attended: Tensor, weights: tuple[Tensor, ...]) -> Tensor:
        """(N, H, T, C) per-head f^h -> (N, T, C) through W_V and the scaled W_O."""
        values = torch.einsum("nhtc,hcd->nthd", attended, weights[1]).reshape(tokens.shape[0], tokens.shape[1], -1)
        return values @ weights[2]

    def residual(self, inputs: Tensor, weights: tuple[Tensor, ...]) -> tuple[Tensor, Tensor, Tensor]:
        """g(x) `(N, C, H, W)` and the state its JVP needs: queries `(N, H, T, d)` and attention `(N, H, T, T)`."""
        tokens = self._tokens(inputs)
        queries = torch.einsum("ntc,hcd->nhtd", tokens, weights[0])
        squared = (queries**2).sum(-1)
        logits = -(squared.unsqueeze(-1) + squared.unsqueeze(-2) - 2.0 * queries @ queries.transpose(-1, -2)) / math.sqrt(self.head_dim)
        attention = torch.softmax(logits, dim=-1)
        mixing = torch.einsum("hcd,hed->hce", weights[0], weights[0]) / math.sqrt(self.head_dim)  # A^h, (H, C, C)
        attended = torch.einsum("nhts,nsc,hce->nhte", attention, tokens, mixing)
        out = self._project(tokens, attended, weights)
        return out.transpose(1, 2).reshape(inputs.shape), queries, attention

    def g(self, inputs: Tensor) -> Tensor:
        """The residual function g(x), `(N, C, H, W) -> (N, C, H, W)`, with the current weights."""
        return self.residual(inputs, self.weights())[0]

    def jacobian_vector_product(self, vectors: Tensor, queries: Tensor, attention: Tensor, inputs: Tensor,
                                weights: tuple[Tensor, ...]) -> Tensor:
        """J_g v at `inputs` (state from `residual`), written out without autograd, `(M, C, H, W)`."""
        tokens, directions = self._tokens(inputs), self._tokens(vectors)
        query_directions = torch.einsum("ntc,hcd->nhtd", directions, weights[0])
        own = (queries * query_directions).sum(-1)  # q_i . dq_i, (N, H, T)
        cross = query_directions @ queries.transpose(-1, -2) + queries @ query_directions.transpose(-1, -2)
        logit_directions = -2.0 / math.sqrt(self.head_dim) * (own.unsqueeze(-1) + own.unsqueeze(-2) - cross)
        attention_directions = attention * (logit_directions - (attention * logit_directions).sum(-1, keepdim=True))
        mixing = torch.einsum("hcd,hed->hce", weights[0], weights[0]) / math.sqrt(self.head_dim)
        attended = (torch.einsum("nhts,nsc,hce->nhte", attention_directions, tokens, mixing)
                    + torch.einsum("nhts,nsc,hce->nhte", attention, directions, mixing))
        return self._project(tokens, attended, weights).transpose(1, 2).reshape(vectors.shape)

    def log_det_explicit(self, inputs: Tensor, probes: Tensor, terms: int, weights: tuple[Tensor, ...] | None = None) -> Tensor:
        """Inference estimator (stored probes, explicit JVPs), `(N,)`."""
        weights = self.weights() if weights is None else weights
        _, queries, attention = self.residual(inputs, weights)
        return explicit_series_log_det(
            lambda vectors, tiled: self.jacobian_vector_product(vectors, tiled[0], tiled[1], tiled[2], weights),
            (queries, attention, inputs), probes, inputs.shape[0], terms,
        )
