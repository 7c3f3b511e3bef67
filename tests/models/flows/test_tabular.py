"""The tabular coupling flow: round trip, log-det against the autograd Jacobian, ONNX parity of the density
graph with the standardisation inside, and a short fit that learns a curved 2-D density."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from oodserve.models.flows.tabular import build_tabular_flow, coupling_masks, export_tabular_flow, train_tabular_flow


def nudged_flow(features: int, seed: int = 0):
    torch.manual_seed(seed)
    flow = build_tabular_flow({"features": features, "couplings": 4, "hidden_features": 16, "hidden_layers": 2}).double()
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))  # away from the identity initialisation
    return flow.eval()


@pytest.mark.parametrize("features", [2, 3, 7])
def test_round_trip_and_log_det_match_the_jacobian(features: int) -> None:
    flow = nudged_flow(features)
    inputs = torch.randn(5, features, dtype=torch.float64)
    latent, logabsdet = flow.transform(inputs)
    assert torch.allclose(flow.transform.inverse(latent), inputs, atol=1e-10)
    for row in range(5):
        jacobian = torch.autograd.functional.jacobian(lambda x: flow.transform(x[None])[0][0], inputs[row])
        assert torch.allclose(logabsdet[row], torch.linalg.slogdet(jacobian)[1], atol=1e-10)


def test_masks_transform_every_feature() -> None:
    masks = torch.stack(coupling_masks(5, 4))
    assert masks.any(dim=0).all() and (~masks).any(dim=0).all()


def test_onnx_density_graph_standardises_inside(tmp_path: Path) -> None:
    flow = nudged_flow(3).float()
    kept, mean, scale = np.array([0, 2, 3]), np.array([1.0, -2.0, 0.5]), np.array([2.0, 0.5, 3.0])
    path = export_tabular_flow(flow, kept, mean, scale, 4, tmp_path / "flow.onnx")
    rows = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
    (onnx_log_prob,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": rows})
    standardized = (rows[:, kept] - mean) / scale
    with torch.no_grad():
        expected = flow.log_prob(torch.as_tensor(standardized, dtype=torch.float32)).numpy()
    np.testing.assert_allclose(onnx_log_prob, expected, rtol=1e-5, atol=1e-4)


def test_a_short_fit_beats_the_standard_normal_on_a_banana() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 2))
    x[:, 1] = 0.5 * x[:, 0] ** 2 + 0.3 * x[:, 1] - 0.5
    x = (x - x.mean(0)) / x.std(0)
    fit = train_tabular_flow(x[:2500], x[2500:], seconds=8.0, seed=0)
    gaussian_nll_per_dim = 0.5 * np.log(2 * np.pi) + 0.5  # a standard normal on standardised data
    assert fit.validation_nll_per_dim < gaussian_nll_per_dim - 0.1 and fit.epochs >= 1
