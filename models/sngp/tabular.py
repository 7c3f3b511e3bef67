"""SNGP for feature vectors (Liu et al. 2020): a spectral-normalised residual MLP backbone (bi-Lipschitz,
Sec. 3.2: a fixed random input projection, then residual blocks `h + relu(W h)` with ||W|| <= c < 1)
and the random-feature Gaussian-process output layer, trained on standardised features and exported with
the standardisation inside the ONNX graph (outputs `logits` mean-field, `variance`, `features`)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from oodserve.models.nn.training import TimedEarlyStopping
from oodserve.models.sngp.backbone import ResidualMLP
from oodserve.models.sngp.gp import RandomFeatureGaussianProcess


class TabularSNGP(nn.Module):
    """`(N, D)` standardised features -> logits (N, K), variance (N,), mean-field logits (N, K), features (N, W)."""

    def __init__(self, features: int, classes: int, width: int, depth: int, random_features: int = 512, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = ResidualMLP(features, width, depth, spectral_bound=0.95)
        self.gp = RandomFeatureGaussianProcess(width, classes, random_features, ridge=1.0, lengthscale=math.sqrt(width) / 2, seed=seed)

    def forward(self, inputs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        hidden = self.backbone(inputs)
        logits, variance, mean_field = self.gp(hidden)
        return logits, variance, mean_field, hidden


@dataclass
class TabularSNGPFit:
    """The trained model and its validation accuracy."""

    model: TabularSNGP
    validation_accuracy: float
    epochs: int
    seconds: float


def width_for(features: int) -> int:
    """Backbone width: at least the input dimension (so the random projection keeps distances), 64..512."""
    return int(np.clip(2 ** math.ceil(math.log2(max(features, 1) + 1)), 64, 512))


@torch.no_grad()
def accuracy(model: TabularSNGP, features: Tensor, labels: Tensor) -> float:
    model.eval()
    logits = model(features)[2]
    return float((logits.argmax(1) == labels).float().mean())


def train_tabular_sngp(
    train: np.ndarray, train_labels: np.ndarray, validation: np.ndarray, validation_labels: np.ndarray, classes: int,
    seconds: float, seed: int = 0, batch_size: int = 128, patience: int = 10, description: str = "sngp",
) -> TabularSNGPFit:
    """Cross-entropy with Adam until `seconds` pass or validation accuracy stalls for `patience` epochs; the
    best weights are kept and the GP precision is then summed exactly over the training set."""
    generator = torch.Generator().manual_seed(seed)
    model = TabularSNGP(train.shape[1], classes, width_for(train.shape[1]), depth=3, seed=seed)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=1e-4)
    x, y = torch.as_tensor(train, dtype=torch.float32), torch.as_tensor(train_labels, dtype=torch.int64)
    x_val, y_val = torch.as_tensor(validation, dtype=torch.float32), torch.as_tensor(validation_labels, dtype=torch.int64)
    stopping = TimedEarlyStopping(model, seconds, patience, higher_is_better=True, description=description)
    while stopping.keep_going():
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(model(x[index])[0], y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if stopping.out_of_time():
                break
        current = accuracy(model, x_val, y_val)
        stopping.end_epoch(current, f"validation accuracy {current:.4f}")
    stopping.restore_best()
    with torch.no_grad():  # exact precision over the training set with the final weights
        model.eval()
        model.gp.reset_precision()
        for start in range(0, len(x), 4096):
            model.gp.accumulate_precision(model.gp.random_features(model.backbone(x[start : start + 4096])))
        model.gp.update_covariance()
    return TabularSNGPFit(model, accuracy(model, x_val, y_val), stopping.epochs, stopping.elapsed())


class TabularSNGPGraph(nn.Module):
    """`x (N, D)` raw features -> mean-field logits (N, K), variance (N,), backbone features (N, W)."""

    kept: Tensor
    mean: Tensor
    scale: Tensor

    def __init__(self, model: TabularSNGP, kept: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> None:
        super().__init__()
        self.model = model.eval()
        self.register_buffer("kept", torch.as_tensor(kept, dtype=torch.int64))
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
        self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32))

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        standardized = (torch.index_select(features, 1, self.kept) - self.mean) / self.scale
        _, variance, mean_field, hidden = self.model(standardized)
        return mean_field, variance, hidden


def export_tabular_sngp(model: TabularSNGP, kept: np.ndarray, mean: np.ndarray, scale: np.ndarray, dimensions: int, path: Path) -> Path:
    """Write the classifier graph (input `x` (N, dimensions) float32) to `path`."""
    graph = TabularSNGPGraph(model, kept, mean, scale).eval()
    outputs = ["logits", "variance", "features"]
    with torch.no_grad():
        torch.onnx.export(
            graph, (torch.zeros(2, dimensions),), str(path), input_names=["x"], output_names=outputs,
            dynamic_axes={"x": {0: "N"}, **{name: {0: "N"} for name in outputs}}, opset_version=17, dynamo=False,
            do_constant_folding=True,
        )
    return path
