"""A flow for feature vectors: affine coupling layers with MLP conditioners (RealNVP, Dinh et al. 2017,
"Density estimation using Real NVP"), trained on standardised features, exported with the
standardisation inside the ONNX graph.

Each coupling keeps the features of its mask `m` and maps the others affinely,
`y = m * x + (1 - m) * (x * exp(s(m * x)) + t(m * x))`, log|det| = sum over the unmasked features of `s`,
with `s = c * tanh(raw / c)` bounded by `c` for stable training. Masks cycle through even / odd
indices and first / second half so every feature is transformed and conditions the others. A learned
elementwise affine layer sits in front.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from oodserve.models.flows.base import CompositeTransform, Flow, Transform
from oodserve.models.nn.training import TimedEarlyStopping


def coupling_masks(features: int, couplings: int) -> list[Tensor]:
    """`couplings` boolean masks (features,) cycling through even / odd indices and first / second half."""
    index = torch.arange(features)
    patterns = [index % 2 == 0, index % 2 == 1, index < features // 2, index >= features // 2]
    return [patterns[number % len(patterns)] for number in range(couplings)]


class ElementwiseAffine(Transform):
    """`z = x * exp(log_scale) + shift` per feature; `(N, D) -> (N, D)`."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(features))
        self.shift = nn.Parameter(torch.zeros(features))

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        logabsdet = self.log_scale.sum().expand(inputs.shape[0])
        return inputs * torch.exp(self.log_scale) + self.shift, logabsdet

    def inverse(self, outputs: Tensor) -> Tensor:
        return (outputs - self.shift) * torch.exp(-self.log_scale)


class AffineCoupling(Transform):
    """Affine coupling on `(N, D)`: masked features pass through and condition the scale and shift of the rest."""

    mask: Tensor

    def __init__(self, mask: Tensor, hidden_features: int, hidden_layers: int, scale_bound: float = 3.0) -> None:
        super().__init__()
        features = int(mask.numel())
        self.register_buffer("mask", mask.to(torch.get_default_dtype()))
        layers: list[nn.Module] = [nn.Linear(features, hidden_features), nn.SiLU()]
        for _ in range(hidden_layers - 1):
            layers += [nn.Linear(hidden_features, hidden_features), nn.SiLU()]
        last = nn.Linear(hidden_features, 2 * features)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)  # starts as the identity
        self.conditioner = nn.Sequential(*layers, last)
        self.scale_bound = scale_bound

    def _scale_and_shift(self, kept: Tensor) -> tuple[Tensor, Tensor]:
        raw_scale, shift = self.conditioner(kept).chunk(2, dim=1)
        free = 1.0 - self.mask
        scale = self.scale_bound * torch.tanh(raw_scale / self.scale_bound) * free
        return scale, shift * free

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor]:
        scale, shift = self._scale_and_shift(inputs * self.mask)
        return inputs * torch.exp(scale) + shift, scale.sum(dim=1)

    def inverse(self, outputs: Tensor) -> Tensor:
        scale, shift = self._scale_and_shift(outputs * self.mask)
        return (outputs - shift) * torch.exp(-scale)


@dataclass
class TabularFlowConfig:
    """Hyperparameters that rebuild a tabular flow."""

    features: int = 2
    couplings: int = 6
    hidden_features: int = 64
    hidden_layers: int = 2


def build_tabular_flow(config: TabularFlowConfig | dict[str, Any]) -> Flow:
    """Elementwise affine, then `couplings` affine couplings; a density on R^features."""
    if isinstance(config, dict):
        config = TabularFlowConfig(**config)
    if config.features < 2:
        raise ValueError("a coupling flow needs at least 2 features")
    transforms: list[Transform] = [ElementwiseAffine(config.features)]
    masks = coupling_masks(config.features, config.couplings)
    transforms += [AffineCoupling(mask, config.hidden_features, config.hidden_layers) for mask in masks]
    flow = Flow(CompositeTransform(transforms), (config.features,))
    flow.config = asdict(config)
    flow.family = "tabular"
    return flow


def size_for(rows: int, features: int) -> TabularFlowConfig:
    """Couplings and widths grown with the data: more rows and features afford a larger conditioner."""
    hidden = int(np.clip(16 * math.ceil(math.sqrt(max(features, 1))), 32, 256))
    hidden = hidden if rows >= 2000 else min(hidden, 64 if rows >= 1000 else 32)
    return TabularFlowConfig(features=features, couplings=4 if features < 8 else 6, hidden_features=hidden, hidden_layers=2)


@dataclass
class TabularFlowFit:
    """The trained flow (best validation weights) and its figures."""

    flow: Flow
    validation_nll_per_dim: float
    epochs: int
    steps: int
    seconds: float


def train_tabular_flow(
    train: np.ndarray, validation: np.ndarray, seconds: float, seed: int = 0, batch_size: int = 256,
    learning_rate: float = 1e-3, patience: int = 12, description: str = "flow",
) -> TabularFlowFit:
    """Maximum likelihood on standardised features (N, D) with Adam until `seconds` pass or the validation
    NLL has not improved for `patience` epochs; returns the best-validation weights."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    flow = build_tabular_flow(size_for(len(train), train.shape[1]))
    optimizer = torch.optim.Adam(flow.parameters(), lr=learning_rate, weight_decay=1e-5)
    train_tensor = torch.as_tensor(train, dtype=torch.float32)
    validation_tensor = torch.as_tensor(validation, dtype=torch.float32)
    stopping = TimedEarlyStopping(flow, seconds, patience, higher_is_better=False, description=description)
    steps = 0
    while stopping.keep_going():
        flow.train()
        order = torch.randperm(len(train_tensor), generator=generator)
        for start in range(0, len(order), batch_size):
            loss = -flow.log_prob(train_tensor[order[start : start + batch_size]]).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(flow.parameters(), 10.0)
            optimizer.step()
            steps += 1
            if stopping.out_of_time():
                break
        nll = validation_nll(flow, validation_tensor)
        stopping.end_epoch(nll, f"validation nll/dim {nll / train.shape[1]:.4f}")
    best_nll = stopping.restore_best()
    flow.eval()
    return TabularFlowFit(flow, best_nll / train.shape[1], stopping.epochs, steps, stopping.elapsed())


@torch.no_grad()
def validation_nll(flow: Flow, features: Tensor, batch_size: int = 4096) -> float:
    """Mean negative log-likelihood (nats per row) of `features` (N, D)."""
    flow.eval()
    total = sum(float(-flow.log_prob(features[start : start + batch_size]).sum()) for start in range(0, len(features), batch_size))
    return total / max(len(features), 1)


class TabularDensityGraph(nn.Module):
    """`x (N, D)` raw features -> `log_prob (N,)`: the flow's log density (nats) of the standardised kept
    columns `(x[:, kept] - mean) / scale`."""

    kept: Tensor
    mean: Tensor
    scale: Tensor

    def __init__(self, flow: Flow, kept: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> None:
        super().__init__()
        self.flow = flow
        self.register_buffer("kept", torch.as_tensor(kept, dtype=torch.int64))
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, features: Tensor) -> Tensor:
        standardized = (torch.index_select(features, 1, self.kept) - self.mean) / self.scale
        return self.flow.log_prob(standardized)


def export_tabular_flow(flow: Flow, kept: np.ndarray, mean: np.ndarray, scale: np.ndarray, dimensions: int, path: Path) -> Path:
    """Write the density graph (input `x` (N, dimensions) float32, output `log_prob` (N,)) to `path`."""
    graph = TabularDensityGraph(flow.eval(), kept, mean, scale).eval()
    example = torch.zeros(2, dimensions)
    with torch.no_grad():
        torch.onnx.export(
            graph, (example,), str(path), input_names=["x"], output_names=["log_prob"],
            dynamic_axes={"x": {0: "N"}, "log_prob": {0: "N"}}, opset_version=17, dynamo=False, do_constant_folding=True,
        )
    return path
