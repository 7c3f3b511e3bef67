"""Rectangular flow: injectivity, the written-out Jacobian and log det(J^T J) against autograd, the unrolled
Cholesky, ONNX parity of the manifold graph and the sampler, and a short training run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from oodserve.config import Settings
from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, load_images
from oodserve.models.fit.manifold import build_manifold_bundle
from oodserve.models.flows.export import ManifoldGraph, SamplingGraph, export_flow
from oodserve.models.flows.rectangular import RectangularFlow, cholesky_log_det
from oodserve.models.flows.train import FlowData, TrainSettings, train_flow
from oodserve.models.flows.zoo import build_flow, preset_config
from oodserve.server.app import create_app

SMALL_SHAPE = (1, 4, 4)


def perturbed_rectangular(input_shape: tuple[int, ...], dtype: torch.dtype = torch.float64, scale: float = 0.1,
                          manifold_dimension: int = 3) -> RectangularFlow:
    torch.manual_seed(0)
    config = {**preset_config("rectangular", "tiny"), "input_shape": input_shape, "manifold_dimension": manifold_dimension}
    flow = build_flow("rectangular", config).to(dtype)
    flow.train()
    flow.log_prob(torch.rand(64, *input_shape, dtype=dtype) * 0.9 + 0.05)  # PCA initialisation
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in flow.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator, dtype=dtype))
    return flow.eval()


def test_unrolled_cholesky_log_det_matches_torch() -> None:
    generator = torch.Generator().manual_seed(0)
    factors = torch.randn(5, 6, 6, generator=generator, dtype=torch.float64)
    matrices = factors @ factors.transpose(1, 2) + 0.1 * torch.eye(6, dtype=torch.float64)
    torch.testing.assert_close(cholesky_log_det(matrices), torch.logdet(matrices))


def test_projection_is_injective_and_idempotent() -> None:
    flow = perturbed_rectangular(SMALL_SHAPE)
    coordinates = torch.randn(7, 3, dtype=torch.float64)
    with torch.no_grad():
        points, _ = flow.decode(coordinates)
        assert torch.max(torch.abs(flow.encode(points.reshape(7, *SMALL_SHAPE)) - coordinates)) < 1e-4  # g^+ o g = id
        inputs = torch.rand(7, *SMALL_SHAPE, dtype=torch.float64) * 0.9 + 0.05
        projection, _ = flow.decode(flow.encode(inputs))
        again, _ = flow.decode(flow.encode(projection.reshape(7, *SMALL_SHAPE)))
        assert torch.max(torch.abs(again - projection)) < 1e-4  # projecting twice changes nothing


def test_written_out_jacobian_and_log_det_match_autograd() -> None:
    flow = perturbed_rectangular(SMALL_SHAPE)
    inputs = torch.rand(3, *SMALL_SHAPE, dtype=torch.float64) * 0.9 + 0.05
    with torch.no_grad():
        coordinates = flow.encode(inputs)
        _, jacobian_t = flow.decode(coordinates, with_jacobian=True)
        log_density = flow.log_prob(inputs)
    assert jacobian_t is not None
    for index in range(3):
        explicit = torch.autograd.functional.jacobian(lambda u: flow.decode(u.unsqueeze(0))[0][0], coordinates[index])  # (D, d)
        torch.testing.assert_close(jacobian_t[index], explicit.T)
        expected = flow.latent_flow.log_prob(coordinates[index : index + 1])[0] - 0.5 * torch.logdet(explicit.T @ explicit)
        torch.testing.assert_close(log_density[index], expected.detach())


def test_onnx_graphs_match_torch(tmp_path: Path) -> None:
    flow = perturbed_rectangular((1, 28, 28), dtype=torch.float32, scale=0.02, manifold_dimension=4)
    density_path, sample_path = export_flow(flow, tmp_path / "flow.onnx")
    session = onnxruntime.InferenceSession(str(density_path), providers=["CPUExecutionProvider"])
    assert [output.name for output in session.get_outputs()] == ["log_prob", "distance", "latent"]
    pixels = torch.randint(0, 256, (5, 1, 28, 28), generator=torch.Generator().manual_seed(3)).float()
    onnx_outputs = session.run(None, {"x": pixels.numpy()})
    with torch.no_grad():
        torch_outputs = ManifoldGraph(flow).eval()(pixels)
    assert onnx_outputs[2].shape == (5, 4)
    np.testing.assert_allclose(onnx_outputs[0], torch_outputs[0].numpy(), rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(onnx_outputs[1], torch_outputs[1].numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(onnx_outputs[2], torch_outputs[2].numpy(), rtol=1e-4, atol=1e-4)
    noise = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))
    sampler = onnxruntime.InferenceSession(str(sample_path), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        expected = SamplingGraph(flow).eval()(noise).numpy()
    np.testing.assert_allclose(sampler.run(None, {"z": noise.numpy()})[0], expected, atol=1e-3)


def test_short_training_lowers_the_objective(tmp_path: Path) -> None:

    rng = np.random.default_rng(0)
    # images near a 2-d manifold: two blobs whose brightness varies
    base = np.zeros((2, 1, 8, 8))
    base[0, :, 1:4, 1:4] = 1.0
    base[1, :, 4:7, 4:7] = 1.0
    weights = rng.uniform(0.2, 1.0, size=(600, 2))
    images = (np.einsum("nk,kchw->nchw", weights, base) * 230 + rng.integers(0, 10, size=(600, 1, 8, 8))).astype(np.uint8)
    settings = TrainSettings(family="rectangular", preset="tiny", out=str(tmp_path), epochs=3, batch_size=50, lr=3e-3, warmup_steps=5,
                             threads=1, overrides={"manifold_dimension": 2})
    metrics = train_flow(settings, FlowData(images[:400], images[400:500], images[500:]))
    history = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["history"]
    assert history[-1]["validation_bpd"] < history[0]["validation_bpd"]
    assert metrics["test_bpd"] is None and np.isfinite(metrics["test_manifold_bits_per_dim"])
    assert metrics["test_reconstruction_rmse_pixels"] < 40


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").exists(), reason="Debian dataset-fashion-mnist not installed")
def test_manifold_bundle_is_served_with_its_sampler(tmp_path: Path) -> None:
    import json

    from fastapi.testclient import TestClient


    train_flow(TrainSettings(family="rectangular", preset="tiny", out=str(tmp_path / "run"), epochs=1, batch_size=32, limit_train=128,
                             limit_test=32, threads=1))
    out = build_manifold_bundle(tmp_path / "run" / "best.pt", tmp_path / "manifold", limit=100, reference_size=150, threads=1)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["flow"]["outputs"] == ["log_prob", "distance", "latent"]
    assert manifest["sampler"]["latent_shape"] == [4] and manifest["batch_typicality"] is None
    names = {"manifold_density", "manifold_typicality", "manifold_distance", "distance_typicality"}
    assert {signal["name"] for signal in manifest["signals"]} == names
    images = load_images(DEFAULT_FASHION_MNIST_DIR, "test").images[:3]
    with TestClient(create_app(Settings(bundle=out, warmup_batch_size=2, intra_op_threads=1, inter_op_threads=1))) as client:
        response = client.post("/v1/score", json={"instances": images.tolist()})
        assert response.status_code == 200, response.text
        assert set(response.json()["results"][0]["signals"]) == names
        sample = client.post("/v1/models/fashion-mnist-manifold/sample", json={"n": 4, "temperature": 0.7, "seed": 0})
        assert sample.status_code == 200 and sample.content[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="not a rectangular flow"):
        build_manifold_bundle(_plain_checkpoint(tmp_path), tmp_path / "nope")


def _plain_checkpoint(tmp_path: Path) -> Path:
    flow = build_flow("glow", {**preset_config("glow", "tiny"), "input_shape": (1, 28, 28)})
    torch.save({"family": "glow", "config": {**preset_config("glow", "tiny"), "input_shape": (1, 28, 28)}, "ema_state": flow.state_dict(),
                "settings": {"seed": 0}}, tmp_path / "glow.pt")
    return tmp_path / "glow.pt"
