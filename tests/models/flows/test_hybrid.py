"""Hybrid flows (flow + classifier head on the latent): the loss, ONNX parity of all three outputs, a short
training run with resume, and the one-model bundle served end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import torch.nn.functional as F
from fastapi.testclient import TestClient

from oodserve.config import Settings
from oodserve.engine import Engine
from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, load_images
from oodserve.models.fit.hybrid import HybridBuildSettings, build_hybrid_bundle
from oodserve.models.flows.export import DensityGraph, export_flow
from oodserve.models.flows.hybrid import LatentClassifier, hybrid_loss, nll_weight_per_image
from oodserve.models.flows.preprocessing import bits_per_dim
from oodserve.models.flows.train import FlowData, TrainSettings, train_flow
from oodserve.server.app import create_app
from tests.models.flows.conftest import perturbed_flow

IMAGE_SHAPE = (1, 28, 28)


def test_hybrid_loss_is_cross_entropy_plus_weighted_bits_per_dim() -> None:
    generator = torch.Generator().manual_seed(0)
    log_prob = torch.randn(6, generator=generator) * 50 - 2000.0
    logits = torch.randn(6, 4, generator=generator)
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    loss, cross_entropy, bits = hybrid_loss(log_prob, logits, labels, 784, 0.5)
    assert torch.isclose(cross_entropy, F.cross_entropy(logits, labels))
    assert torch.isclose(bits, bits_per_dim(log_prob, 784).mean())
    assert torch.isclose(loss, cross_entropy + 0.5 * bits)
    # the same weight on the per-image NLL in nats: d loss / d log_prob_i = -w / N
    log_prob.requires_grad_(True)
    hybrid_loss(log_prob, logits, labels, 784, 0.5)[0].backward()
    assert log_prob.grad is not None
    np.testing.assert_allclose(log_prob.grad.numpy(), -nll_weight_per_image(0.5, 784) / 6, rtol=1e-5)
    with pytest.raises(ValueError, match="at least 2 classes"):
        LatentClassifier(784, 1)


@pytest.mark.parametrize("family", ["iresnet", "iresnet+l2", "glow"])
def test_onnx_outputs_of_a_hybrid_flow_match_torch(family: str, tmp_path: Path) -> None:
    flow = perturbed_flow(family, IMAGE_SHAPE, dtype=torch.float32, scale=0.03, extra={"classes": 10})
    assert flow.classifier is not None
    with torch.no_grad():
        flow.classifier.linear.weight.normal_(0.0, 0.05)
    density_path, _ = export_flow(flow, tmp_path / "flow.onnx")
    session = onnxruntime.InferenceSession(str(density_path), providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    assert names[0] == "log_prob" and names[-2:] == ["logits", "features"]
    pixels = torch.randint(0, 256, (5, *IMAGE_SHAPE), generator=torch.Generator().manual_seed(3)).float()
    onnx_outputs = dict(zip(names, session.run(None, {"x": pixels.numpy()})))
    with torch.no_grad():
        torch_outputs = dict(zip(names, DensityGraph(flow).eval()(pixels)))
    assert onnx_outputs["logits"].shape == (5, 10) and onnx_outputs["features"].shape == (5, 784)
    np.testing.assert_allclose(onnx_outputs["features"], torch_outputs["features"].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(onnx_outputs["logits"], torch_outputs["logits"].numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(bits_per_dim(torch.from_numpy(onnx_outputs["log_prob"]), 784).numpy(),
                               bits_per_dim(torch_outputs["log_prob"], 784).numpy(), atol=1e-3)


needs_fashion_mnist = pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.exists(), reason="Debian dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def hybrid_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("hybrid") / "run"
    settings = TrainSettings(family="iresnet", preset="tiny", out=str(out), epochs=1, batch_size=32, limit_train=192, limit_test=64,
                             threads=1, hybrid=True, nll_weight=1.0)
    metrics = train_flow(settings)
    assert metrics["hybrid"] and 0.0 <= metrics["test_accuracy"] <= 1.0 and math.isfinite(metrics["test_cross_entropy"])
    assert metrics["config"]["classes"] == 10
    # one more epoch by resume continues the same run from its checkpoint
    settings.epochs, settings.resume = 2, True
    resumed = train_flow(settings)
    assert resumed["steps"] == 2 * metrics["steps"] and resumed["epochs_completed"] == 2
    history = torch.load(out / "checkpoint.pt", weights_only=False)["state"]["history"]
    assert all("validation_accuracy" in entry and "validation_objective" in entry for entry in history)
    return out / "best.pt"


@needs_fashion_mnist
def test_training_needs_labels(tmp_path: Path) -> None:

    images = np.zeros((8, 1, 28, 28), dtype=np.uint8)
    with pytest.raises(ValueError, match="needs labels"):
        train_flow(TrainSettings(family="iresnet", preset="tiny", out=str(tmp_path), hybrid=True), FlowData(images, images, images))


@needs_fashion_mnist
def test_hybrid_bundle_serves_every_signal_from_one_model(hybrid_checkpoint: Path, tmp_path: Path) -> None:

    out = build_hybrid_bundle(HybridBuildSettings(checkpoint=str(hybrid_checkpoint), out=str(tmp_path / "hybrid"), name="hybrid",
                                                  limit=120, reference_size=200, threads=1))
    manifest = json.loads((out / "manifest.json").read_text())
    assert list(manifest["models"]) == ["flow"]
    assert manifest["models"]["flow"]["outputs"] == ["log_prob", "logits", "features"]
    assert manifest["classifier"] == {"model": "flow", "logits": "logits"}
    assert {signal["model"] for signal in manifest["signals"]} == {"flow"}
    assert {signal["name"] for signal in manifest["signals"]} == {"bits_per_dim", "typicality", "input_complexity", "max_softmax",
                                                                   "feature_density"}
    assert "bits_per_dim" not in manifest["fusion"]["signals"]
    with np.load(out / "feature_density.npz") as arrays:
        assert arrays["precision_cholesky"].shape == (1, 784, 784)
    images = load_images(DEFAULT_FASHION_MNIST_DIR, "test").images[:3]
    with TestClient(create_app(Settings(bundle=out, warmup_batch_size=2, intra_op_threads=1, inter_op_threads=1))) as client:
        response = client.post("/v1/score", json={"instances": images.tolist()})
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        assert set(result["signals"]) == {"bits_per_dim", "typicality", "input_complexity", "max_softmax", "feature_density"}
        assert result["prediction"]["label"] in manifest["labels"]
        sample = client.post("/v1/models/hybrid/sample", json={"n": 4, "temperature": 0.7, "seed": 0})
        assert sample.status_code == 200 and sample.content[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_plain_flow_checkpoint_is_refused(tmp_path: Path) -> None:

    flow = perturbed_flow("iresnet", IMAGE_SHAPE, dtype=torch.float32)
    torch.save({"family": "iresnet", "config": flow.config, "ema_state": flow.state_dict(), "settings": {"seed": 0}},
               tmp_path / "best.pt")
    with pytest.raises(ValueError, match="not a hybrid flow"):
        build_hybrid_bundle(HybridBuildSettings(checkpoint=str(tmp_path / "best.pt"), out=str(tmp_path / "out")))


SHIPPED_HYBRID = Path(__file__).resolve().parents[3] / "models" / "bundles" / "fashion-mnist-iresnet"


@pytest.mark.skipif(not SHIPPED_HYBRID.exists(), reason="the hybrid bundle is not in this checkout")
def test_shipped_hybrid_bundle_verifies_and_scores_from_one_model() -> None:

    engine = Engine.load(SHIPPED_HYBRID)
    assert list(engine.manifest.models) == ["flow"]
    images = np.zeros((2, 1, 28, 28), dtype=np.float32)
    images[1, 0, 4:24, 8:20] = 200.0
    scores = engine.score(images, 0.05)
    assert set(scores.signals) == {"bits_per_dim", "typicality", "input_complexity", "max_softmax", "feature_density"}
    assert scores.predicted_class is not None and scores.predicted_class.shape == (2,)
    assert np.all((scores.fused_p_value > 0) & (scores.fused_p_value <= 1))
