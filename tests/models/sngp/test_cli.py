"""Smoke test of `train sngp` / `export sngp` on a tiny synthetic IDX data set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import typer
from typer.testing import CliRunner

from oodserve.models.data import load_images
from oodserve.models.sngp.backbone import SNGPClassifier, SNGPConfig
from oodserve.models.sngp.cli import register
from oodserve.models.sngp.train import TrainSettings, epochs_for_budget, load_checkpoint, standardize
from oodserve.models.splits import bundle_split
from tests.helpers.data import write_idx


def fake_fashion_mnist(directory: Path) -> Path:
    rng = np.random.default_rng(0)
    directory.mkdir()
    for prefix, count in (("train", 12100), ("t10k", 50)):
        labels = rng.integers(0, 10, count)
        images = rng.integers(0, 40, (count, 28, 28)) + (labels * 20)[:, None, None]
        write_idx(directory / f"{prefix}-images-idx3-ubyte", images)
        write_idx(directory / f"{prefix}-labels-idx1-ubyte", labels)
    return directory


def cli_app() -> typer.Typer:
    app, train_app, export_app = typer.Typer(), typer.Typer(), typer.Typer()
    register(train_app, export_app)
    app.add_typer(train_app, name="train")
    app.add_typer(export_app, name="export")
    return app


def test_train_then_export_tiny_run(tmp_path: Path) -> None:
    data = fake_fashion_mnist(tmp_path / "data")
    runner = CliRunner()
    tiny = ["--limit-train", "64", "--batch-size", "32", "--widths", "2,2,4", "--random-features", "32",
            "--threads", "1", "--data", str(data)]
    result = runner.invoke(cli_app(), ["train", "sngp", "--out", str(tmp_path / "run"), "--epochs", "2", *tiny])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("test_accuracy", "test_ece", "validation_accuracy", "train_minutes", "parameters"):
        assert key in metrics
    assert metrics["epochs_completed"] == 2 and all(h["complete"] for h in metrics["history"])
    assert (tmp_path / "run" / "checkpoint.pt").exists()

    onnx_path = tmp_path / "sngp.onnx"
    result = runner.invoke(cli_app(), ["export", "sngp", str(tmp_path / "run" / "model.pt"), "--out", str(onnx_path)])
    assert result.exit_code == 0, result.output
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits, variance, features = session.run(None, {"x": np.zeros((3, 1, 28, 28), np.float32)})
    assert logits.shape == (3, 10) and variance.shape == (3,) and features.shape == (3, 4)
    assert np.all(variance > 0)


def test_time_budget_cut_rebuilds_the_precision_without_gradients(tmp_path: Path) -> None:
    data = fake_fashion_mnist(tmp_path / "data")
    result = CliRunner().invoke(cli_app(), [
        "train", "sngp", "--out", str(tmp_path / "cut"), "--epochs", "3", "--max-minutes", "0",
        "--limit-train", "64", "--widths", "2,2,4", "--random-features", "32", "--threads", "1", "--data", str(data),
    ])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert metrics["history"][-1]["complete"] is False
    state = torch.load(tmp_path / "cut" / "model.pt", weights_only=False)["state_dict"]
    precision = state["gp.precision"]
    # ridge * I plus the features of all 64 training images (each ||phi||^2 is about 1)
    assert float(torch.trace(precision)) > 32 * 1.0 + 32


def test_epochs_zero_takes_as_many_epochs_as_the_budget_affords(tmp_path: Path) -> None:

    model = SNGPClassifier(SNGPConfig.from_dict({**SNGPConfig().to_dict(), "widths": [2, 2, 4], "num_random_features": 32}))
    images, labels = torch.randn(256, 1, 28, 28), torch.randint(0, 10, (256,))
    settings = TrainSettings(batch_size=32, threads=1, max_epochs=1000)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    epochs, per_epoch = epochs_for_budget(model, images, labels, settings, seconds=5.0, validation_count=64, final_forwards=128)
    assert per_epoch > 0 and epochs >= 1
    # more time buys proportionally more epochs, capped by max_epochs; the probe trains a copy, never the model
    more, _ = epochs_for_budget(model, images, labels, settings, seconds=50.0, validation_count=64, final_forwards=128)
    assert more >= 5 * epochs
    capped, _ = epochs_for_budget(model, images, labels, TrainSettings(batch_size=32, max_epochs=3), 50.0, 64, 128)
    assert capped == 3
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())

    data = fake_fashion_mnist(tmp_path / "data")
    result = CliRunner().invoke(cli_app(), [
        "train", "sngp", "--out", str(tmp_path / "auto"), "--epochs", "0", "--max-minutes", "0.1",
        "--limit-train", "256", "--batch-size", "32", "--widths", "2,2,4", "--random-features", "32", "--threads", "1",
        "--data", str(data),
    ])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "auto" / "metrics.json").read_text())
    assert metrics["epochs_completed"] >= 2 and all(h["complete"] for h in metrics["history"])


def test_the_final_precision_is_summed_on_eval_mode_features_of_the_trained_model(tmp_path: Path) -> None:

    data = fake_fashion_mnist(tmp_path / "data")
    result = CliRunner().invoke(cli_app(), [
        "train", "sngp", "--out", str(tmp_path / "run"), "--epochs", "2", "--limit-train", "64", "--batch-size", "32",
        "--widths", "2,2,4", "--random-features", "32", "--threads", "1", "--data", str(data),
    ])
    assert result.exit_code == 0, result.output
    model, checkpoint = load_checkpoint(tmp_path / "run" / "model.pt")

    train = load_images(data, "train")
    images = standardize(train.images[bundle_split(len(train.images)).train][:64], model.config)
    with torch.no_grad():
        phi = model.gp.random_features(model.backbone(images)).double()  # eval mode: what the ONNX graph computes
    expected = model.config.ridge * torch.eye(phi.shape[1], dtype=torch.float64) + phi.t() @ phi
    assert torch.allclose(model.gp.precision, expected, rtol=1e-6, atol=1e-6)
