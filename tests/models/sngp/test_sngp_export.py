"""ONNX export of SNGP: output names/shapes, dynamic batch, parity with PyTorch, no batch x batch tensor."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F

from oodserve.models.nn.spectral import refresh_all_sigmas
from oodserve.models.sngp.backbone import SNGPClassifier, SNGPConfig
from oodserve.models.sngp.export import export_model


def briefly_trained_model() -> SNGPClassifier:
    torch.manual_seed(0)
    model = SNGPClassifier(SNGPConfig(widths=(4, 4, 8), num_random_features=64, spectral_bound=1.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    images = torch.rand(32, 1, 28, 28) * 255
    labels = torch.randint(0, 10, (32,))
    model.train()
    model.gp.reset_precision()
    for _ in range(3):
        logits, _, _, _ = model(model.normalize(images))
        optimizer.zero_grad()
        F.cross_entropy(logits, labels).backward()
        optimizer.step()
    refresh_all_sigmas(model)
    model.gp.update_covariance()
    return model.eval()


def test_onnx_matches_torch_and_has_no_batch_by_batch_tensor(tmp_path: Path) -> None:
    model = briefly_trained_model()
    path = export_model(model, tmp_path / "sngp.onnx")
    assert not list(tmp_path.glob("*.data"))
    raw = np.random.default_rng(0).integers(0, 256, size=(7, 1, 28, 28)).astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["x"]
    assert [o.name for o in session.get_outputs()] == ["logits", "variance", "features"]
    logits, variance, features = session.run(None, {"x": raw})
    assert logits.shape == (7, 10) and variance.shape == (7,) and features.shape == (7, 8)
    with torch.no_grad():
        _, torch_variance, torch_mean_field, torch_features = model(model.normalize(torch.from_numpy(raw)))
    np.testing.assert_allclose(logits, torch_mean_field.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(variance, torch_variance.numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(features, torch_features.numpy(), atol=1e-4, rtol=0)
    single = session.run(None, {"x": raw[:1]})
    np.testing.assert_allclose(single[1], variance[:1], atol=1e-5)

    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info]
    assert sum("N" in dims for dims in shapes) > 10  # the batch axis is tracked through the graph
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert dims.count("N") <= 1, f"{value.name} has shape {dims}"
    assert min(opset.version for opset in inferred.opset_import if opset.domain in ("", "ai.onnx")) >= 17
