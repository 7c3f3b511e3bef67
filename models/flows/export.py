"""ONNX export of trained flows: a density graph and a sampling graph, weights kept inside the file.

Density graph (`FILE.onnx`): input `x` float32 `(N, 1, 28, 28)` raw pixels 0..255 ->
`log_prob` `(N,)` = log density (nats) of `u = (x + 0.5) / 256` (see `preprocessing.py`; bits/dim =
-(log_prob - D ln 256) / (D ln 2)), plus `level_0`, `level_1`, ... `(N,)` per-level latent
log-densities for multi-scale families, and for a hybrid flow (`oodserve.models.flows.hybrid`) `logits` `(N, K)` and
`features` `(N, D)` (the latent z the head reads); for a rectangular flow `log_prob`, `distance`, `latent`
(`ManifoldGraph`). Sampling graph (`FILE_sample.onnx`): input `z` float32
`(N, D)` standard-normal latents (scale by a temperature before feeding) -> `x` float32
`(N, 1, 28, 28)` in [0, 255]. Both have a dynamic batch axis `N` and are deterministic.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from oodserve.models.flows.base import ExportPreparable, Flow, FrozenInverse, InjectiveFlow
from oodserve.models.flows.preprocessing import centre_of_bin, unit_to_pixels
from oodserve.models.flows.train import load_checkpoint_flow

DEFAULT_OPSET = 18


class DensityGraph(nn.Module):
    """`x (N, C, H, W)` in 0..255 -> `(log_prob (N,), level_0 (N,), ...)`."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, pixels: Tensor) -> tuple[Tensor, ...]:
        latent, log_prob, levels = self.flow.latent_log_prob_with_levels(centre_of_bin(pixels))
        if self.flow.classifier is None:
            return (log_prob, *levels)
        return (log_prob, *levels, self.flow.classifier(latent), latent)


class ManifoldGraph(nn.Module):
    """A rectangular flow (`oodserve.models.flows.rectangular`): `x (N, C, H, W)` in 0..255 -> (`log_prob (N,)` nats on the
    manifold at the projection, `distance (N,)` = ||x - x_hat|| in pixel levels, `latent (N, d)` manifold coordinates)."""

    def __init__(self, flow: InjectiveFlow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, pixels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        log_density, squared_distance, coordinates = self.flow.manifold_outputs(centre_of_bin(pixels))
        return log_density, torch.sqrt(squared_distance) * 255.0, coordinates


class SamplingGraph(nn.Module):
    """`z (N, D)` standard-normal latents -> `x (N, C, H, W)` pixels clamped to [0, 255]."""

    def __init__(self, flow: Flow) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, noise: Tensor) -> Tensor:
        return unit_to_pixels(self.flow.sample_from_noise(noise))


def prepare_for_export(flow: Flow) -> Flow:
    """Eval mode, and precompute anything whose computation ONNX cannot express (e.g. W^-1 of 1x1 convs)."""
    flow.eval()
    for module in flow.modules():
        if isinstance(module, FrozenInverse):
            module.freeze_inverse()
        if isinstance(module, ExportPreparable):
            module.prepare_for_export()
    return flow


def level_names(flow: Flow) -> list[str]:
    """Names of the per-level outputs of `flow` (empty for single-scale families)."""
    with torch.no_grad():
        probe = torch.full((1, *flow.event_shape), 0.5)
        _, levels = flow.log_prob_with_levels(probe)
    return [f"level_{index}" for index in range(len(levels))]


def _export(module: nn.Module, example: Tensor, path: Path, input_name: str, output_names: list[str], opset: int) -> None:
    dynamic_axes = {input_name: {0: "N"}, **{name: {0: "N"} for name in output_names}}
    with torch.no_grad():
        torch.onnx.export(
            module, (example,), str(path), input_names=[input_name], output_names=output_names,
            dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True,
        )


def sample_graph_path(density_path: str | Path) -> Path:
    """`dir/flow.onnx` -> `dir/flow_sample.onnx`."""
    density_path = Path(density_path)
    return density_path.with_name(f"{density_path.stem}_sample{density_path.suffix or '.onnx'}")


def export_flow(flow: Flow, out: str | Path, opset: int = DEFAULT_OPSET) -> tuple[Path, Path]:
    """Write the density graph to `out` and the sampling graph next to it; returns both paths."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    flow = prepare_for_export(flow.float())
    example_pixels = torch.randint(0, 256, (2, *flow.event_shape)).float()
    latent_dimension = flow.latent_dimension if isinstance(flow, InjectiveFlow) else flow.dimension
    if isinstance(flow, InjectiveFlow):
        _export(ManifoldGraph(flow).eval(), example_pixels, out, "x", ["log_prob", "distance", "latent"], opset)
    else:
        names = ["log_prob", *level_names(flow), *(["logits", "features"] if flow.classifier is not None else [])]
        _export(DensityGraph(flow).eval(), example_pixels, out, "x", names, opset)
    sample_path = sample_graph_path(out)
    _export(SamplingGraph(flow).eval(), torch.randn(2, latent_dimension), sample_path, "z", ["x"], opset)
    return out, sample_path


def export_checkpoint(checkpoint: str | Path, out: str | Path, opset: int = DEFAULT_OPSET) -> tuple[Path, Path]:
    """Rebuild the flow stored in a training checkpoint (EMA weights) and export both graphs."""
    flow, _ = load_checkpoint_flow(checkpoint)
    return export_flow(flow, out, opset=opset)


def onnx_latency_per_image_ms(path: str | Path, batch_size: int = 64, repeats: int = 20, threads: int = 1) -> float:
    """Measured onnxruntime (CPU) wall time per image in ms for the density graph at `batch_size`."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    shape = [batch_size, *[int(d) for d in session.get_inputs()[0].shape[1:]]]
    pixels = np.random.default_rng(0).integers(0, 256, size=shape).astype(np.float32)
    session.run(None, {"x": pixels})
    start = time.perf_counter()
    for _ in range(repeats):
        session.run(None, {"x": pixels})
    return (time.perf_counter() - start) / (repeats * batch_size) * 1000.0
