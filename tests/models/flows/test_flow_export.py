"""ONNX export: parity with PyTorch (1e-3 bits/dim), dynamic batch, per-level outputs, sampling graph."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from oodserve.models.flows.export import DensityGraph, SamplingGraph, export_flow, onnx_latency_per_image_ms
from oodserve.models.flows.preprocessing import bits_per_dim
from tests.models.flows.conftest import FAMILIES, perturbed_flow

IMAGE_SHAPE = (1, 28, 28)
FORBIDDEN_OPS = {"Inverse", "Det", "SLogDet", "Loop", "If", "NonZero", "Compress", "RandomNormal", "RandomUniform",
                 "RandomNormalLike", "RandomUniformLike"}


def _session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("family", FAMILIES)
def test_onnx_matches_torch(family: str, tmp_path: Path) -> None:
    # A mild perturbation keeps log_prob of extreme images (all 0 / all 255) in a range where float32
    # rounding of the sum over 784 pixels stays far below 1e-3 bits/dim.
    flow = perturbed_flow(family, IMAGE_SHAPE, dtype=torch.float32, scale=0.03)
    density_path, sample_path = export_flow(flow, tmp_path / "flow.onnx")
    assert sample_path == tmp_path / "flow_sample.onnx"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flow.onnx", "flow_sample.onnx"]  # no side files

    model = onnx.load(str(density_path))
    assert max(opset.version for opset in model.opset_import if opset.domain in ("", "ai.onnx")) >= 17
    used_ops = {node.op_type for node in model.graph.node} | {node.op_type for node in onnx.load(str(sample_path)).graph.node}
    assert not used_ops & FORBIDDEN_OPS

    generator = torch.Generator().manual_seed(7)
    pixels = torch.randint(0, 256, (5, *IMAGE_SHAPE), generator=generator).float()
    pixels[0] = 0.0
    pixels[1] = 255.0
    density_session = _session(density_path)
    onnx_outputs = density_session.run(None, {"x": pixels.numpy()})
    with torch.no_grad():
        torch_outputs = DensityGraph(flow).eval()(pixels)
    names = [output.name for output in density_session.get_outputs()]
    assert names[0] == "log_prob"
    if family in ("glow", "nsf"):
        assert names[1:] == ["level_0", "level_1", "level_2"]
    assert len(onnx_outputs) == len(torch_outputs)
    onnx_bpd = bits_per_dim(torch.from_numpy(onnx_outputs[0]), flow.dimension)
    torch_bpd = bits_per_dim(torch_outputs[0], flow.dimension)
    assert onnx_outputs[0].shape == (5,)
    assert (onnx_bpd - torch_bpd).abs().max().item() < 1e-3
    for onnx_level, torch_level in zip(onnx_outputs[1:], torch_outputs[1:]):
        assert np.abs(onnx_level - torch_level.numpy()).max() / flow.dimension / np.log(2) < 1e-3

    noise = torch.randn(4, flow.dimension, generator=generator)
    onnx_samples = _session(sample_path).run(None, {"z": noise.numpy()})[0]
    with torch.no_grad():
        torch_samples = SamplingGraph(flow).eval()(noise).numpy()
    assert onnx_samples.shape == (4, *IMAGE_SHAPE)
    assert onnx_samples.min() >= 0.0 and onnx_samples.max() <= 255.0
    assert np.abs(onnx_samples - torch_samples).max() < 0.05
    # The density of the exported samples agrees too (1e-3 bits/dim).
    with torch.no_grad():
        onnx_sample_bpd = bits_per_dim(flow.log_prob((torch.from_numpy(onnx_samples) + 0.5) / 256), flow.dimension)
        torch_sample_bpd = bits_per_dim(flow.log_prob((torch.from_numpy(torch_samples) + 0.5) / 256), flow.dimension)
    assert (onnx_sample_bpd - torch_sample_bpd).abs().max().item() < 1e-3

    assert onnx_latency_per_image_ms(density_path, batch_size=4, repeats=1) > 0.0
