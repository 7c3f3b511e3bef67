"""Export a trained SNGP to ONNX: `x` (N, 1, 28, 28) raw 0..255 -> `logits`, `variance`, `features`.

Pre-processing (scaling and standardisation) lives inside the graph; the spectral-normalised
weights are constants in eval mode; the variance is computed row by row
(`ridge * sum((Phi Sigma) * Phi, -1)`), so no batch-by-batch matrix appears in the graph.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from oodserve.models.sngp.backbone import SNGPClassifier
from oodserve.models.sngp.train import load_checkpoint

INPUT_NAME = "x"
OUTPUT_NAMES = ["logits", "variance", "features"]


class SNGPExportGraph(nn.Module):
    """Raw pixels `(N, C, H, W)` -> mean-field logits `(N, K)`, variance `(N,)`, backbone features `(N, F)`."""

    def __init__(self, model: SNGPClassifier) -> None:
        super().__init__()
        self.model = model.eval()

    def forward(self, raw_pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _, variance, mean_field, features = self.model(self.model.normalize(raw_pixels))
        return mean_field, variance, features


def export_model(model: SNGPClassifier, path: str | Path, opset: int = 17) -> Path:
    """Write `model` (eval mode, covariance already set) to a single self-contained .onnx file."""
    if opset < 17:
        raise ValueError("opset must be >= 17")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    graph = SNGPExportGraph(model).eval()
    example = torch.full((2, model.config.in_channels, *model.config.image_hw), 128.0)
    dynamic_axes = {INPUT_NAME: {0: "N"}, **{name: {0: "N"} for name in OUTPUT_NAMES}}
    with torch.no_grad():
        torch.onnx.export(
            graph, (example,), str(path), input_names=[INPUT_NAME], output_names=OUTPUT_NAMES,
            dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True,
        )
    return path


def export_checkpoint(checkpoint: str | Path, path: str | Path, opset: int = 17) -> Path:
    """Rebuild the model from a `train sngp` checkpoint and export it."""
    model, _ = load_checkpoint(checkpoint)
    return export_model(model, path, opset=opset)
