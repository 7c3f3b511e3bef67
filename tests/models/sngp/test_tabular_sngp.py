"""SNGP on vectors: it learns separable classes, its variance grows away from the data, and the ONNX graph
(standardisation inside) matches PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from oodserve.models.sngp.tabular import export_tabular_sngp, train_tabular_sngp


def test_tabular_sngp_classifies_knows_distance_and_exports(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 900)
    features = rng.normal(size=(900, 4)) + 4.0 * np.eye(4)[labels]
    fit = train_tabular_sngp(features[:700], labels[:700], features[700:], labels[700:], 3, seconds=10.0, seed=0)
    assert fit.validation_accuracy > 0.9
    kept, mean, scale = np.arange(4), np.zeros(4), np.ones(4)
    path = export_tabular_sngp(fit.model, kept, mean, scale, 4, tmp_path / "sngp.onnx")
    queries = np.concatenate([features[700:705], features[700:705] + 30.0]).astype(np.float32)
    logits, variance, hidden = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": queries})
    with torch.no_grad():
        _, torch_variance, torch_logits, torch_hidden = fit.model(torch.as_tensor(queries))
    np.testing.assert_allclose(logits, torch_logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(variance, torch_variance.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hidden, torch_hidden.numpy(), rtol=1e-4, atol=1e-4)
    assert variance[5:].min() > variance[:5].max()  # distance awareness
