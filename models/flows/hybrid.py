"""Hybrid flows: one invertible network that is a density model and a classifier at once.

The flow's latent `z = f(x)` `(N, D)` feeds a linear softmax head, `logits = W z + b` `(N, K)`, so
`p(x, y) = p(y | f(x)) p(x)` with both factors exact (Nalisnick et al. 2019, "Hybrid models with deep
and invertible features"; Behrmann et al. 2019, i-ResNet, section 5 on hybrid modelling). Training
minimises `CE(logits, y) + lambda * bits/dim(x)`: the cross-entropy is per image and the density term
per dimension, so `lambda = 1` weighs one bit/dim like one nat of classification loss (a per-image NLL
weight of `1 / (D ln 2)`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oodserve.models.flows.preprocessing import bits_per_dim


class LatentClassifier(nn.Module):
    """Linear softmax head on the flow's flat latent: `(N, D) -> logits (N, classes)`."""

    def __init__(self, dimension: int, classes: int) -> None:
        super().__init__()
        if classes < 2:
            raise ValueError(f"a classifier head needs at least 2 classes, got {classes}")
        self.linear = nn.Linear(dimension, classes)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, latent: Tensor) -> Tensor:
        return self.linear(latent)


def hybrid_loss(log_prob: Tensor, logits: Tensor, labels: Tensor, dimension: int, nll_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """`CE + nll_weight * bits/dim`, means over the batch: `log_prob (N,)` nats of `u in [0,1]^D`, `logits (N, K)`,
    `labels (N,)` int64 -> (loss, cross-entropy, bits/dim), each a scalar."""
    cross_entropy = F.cross_entropy(logits, labels)
    bits = bits_per_dim(log_prob, dimension).mean()
    return cross_entropy + nll_weight * bits, cross_entropy, bits


def nll_weight_per_image(nll_weight: float, dimension: int) -> float:
    """The same weight expressed on the per-image negative log-likelihood in nats: `lambda / (D ln 2)`."""
    return nll_weight / (dimension * math.log(2.0))


@torch.no_grad()
def accuracy(logits: Tensor, labels: Tensor) -> float:
    """Fraction of `argmax logits (N, K)` equal to `labels (N,)`."""
    return float((logits.argmax(dim=1) == labels).float().mean())
