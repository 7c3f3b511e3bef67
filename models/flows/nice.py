"""NICE (Dinh, Krueger & Bengio 2014): additive coupling layers and a diagonal rescaling, on vectors `(N, D)`.

Volume preserving except for the final rescaling, so it is a useful control among the families.
Images are flattened after the logit pre-processing; the couplings alternate between the even and
the odd coordinates (NICE sec. 5.1).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from oodserve.models.flows.base import CompositeTransform, Flatten, Flow, Transform
from oodserve.models.flows.preprocessing import LogitTransform


def mlp(in_features: int, hidden_features: int, hidden_layers: int, out_features: int, zero_last: bool = True) -> nn.Sequential:
    """ReLU multi-layer perceptron; the last layer starts at zero so each coupling starts as the identity."""
    layers: list[nn.Module] = [nn.Linear(in_features, hidden_features), nn.ReLU()]
    for _ in range(hidden_layers - 1):
        layers += [nn.Linear(hidden_features, hidden_features), nn.ReLU()]
    last = nn.Linear(hidden_features, out_features)
    if zero_last:
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
    layers.append(last)
    return nn.Sequential(*layers)


def split_parity(inputs: Tensor, parity: int) -> tuple[Tensor, Tensor]:
    """`(N, D)` with D even -> (conditioning coordinates, transformed coordinates), each `(N, D/2)`.

    parity 0 conditions on the even coordinates, parity 1 on the odd ones."""
    pairs = inputs.reshape(inputs.shape[0], -1, 2)
    return pairs[:, :, parity], pairs[:, :, 1 - parity]


def merge_parity(conditioning: Tensor, transformed: Tensor, parity: int) -> Tensor:
    """Inverse of `split_parity`."""
    pieces = (conditioning, transformed) if parity == 0 else (transformed, conditioning)
    return torch.stack(pieces, dim=2).reshape(conditioning.shape[0], -1)


class AdditiveCoupling(Transform):
    """`y_b = x_b + m(x_a)` (NICE eq. 6); log|det| = 0."""

    def __init__(self, features: int, hidden_features: int, hidden_layers: int, parity: int) -> None:
        super().__init__()
        if features % 2:
            raise ValueError("NICE coupling needs an even number of features")
        self.parity = parity
        self.shift_network = mlp(features // 2, hidden_features, hidden_layers, features // 2)

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        conditioning, transformed = split_parity(inputs, self.parity)
        outputs = merge_parity(conditioning, transformed + self.shift_network(conditioning), self.parity)
        return outputs, torch.zeros(inputs.shape[0], dtype=inputs.dtype, device=inputs.device)

    def inverse(self, outputs: Tensor) -> Tensor:
        conditioning, transformed = split_parity(outputs, self.parity)
        return merge_parity(conditioning, transformed - self.shift_network(conditioning), self.parity)


class DiagonalRescaling(Transform):
    """`y = x * exp(s)` (NICE sec. 3.3); log|det| = sum(s)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(features))

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        return inputs * torch.exp(self.log_scale), self.log_scale.sum().expand(inputs.shape[0])

    def inverse(self, outputs: Tensor) -> Tensor:
        return outputs * torch.exp(-self.log_scale)


@dataclass
class NiceConfig:
    """Hyperparameters that rebuild a NICE flow."""

    input_shape: tuple[int, ...] = (1, 28, 28)
    couplings: int = 4
    hidden_features: int = 400
    hidden_layers: int = 4
    logit_alpha: float = 0.05


def build_nice(config: NiceConfig | dict) -> Flow:
    """NICE on `u in [0, 1]^D` (images `(C, H, W)` are flattened after the logit)."""
    if isinstance(config, dict):
        config = NiceConfig(**{**config, "input_shape": tuple(config.get("input_shape", (1, 28, 28)))})
    features = int(math.prod(config.input_shape))
    transforms: list[Transform] = [LogitTransform(config.logit_alpha), Flatten(tuple(config.input_shape))]
    transforms += [
        AdditiveCoupling(features, config.hidden_features, config.hidden_layers, parity=index % 2)
        for index in range(config.couplings)
    ]
    transforms.append(DiagonalRescaling(features))
    flow = Flow(CompositeTransform(transforms), tuple(config.input_shape))
    flow.config = asdict(config)
    return flow
