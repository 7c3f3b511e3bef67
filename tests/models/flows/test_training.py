"""Trainer and CLI: a tiny run lowers the loss, checkpoints rebuild the model, resume and export work."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from oodserve.models.flows.base import Flow, Transform
from oodserve.models.flows.cli import register
from oodserve.models.flows.train import (
    TrainSettings,
    evaluate_bits_per_dim,
    evaluate_dequantized_bits_per_dim,
    load_checkpoint_flow,
    mutate_pixels,
    train_flow,
)


@pytest.mark.parametrize("family", ["nice", "glow", "nsf", "iresnet"])
def test_tiny_training_run_lowers_the_loss(family: str, synthetic_image_dir: Path, tmp_path: Path) -> None:
    settings = TrainSettings(family=family, data=str(synthetic_image_dir), out=str(tmp_path), epochs=2,
                             batch_size=32, lr=3e-3, warmup_steps=2, preset="tiny", limit_train=192,
                             limit_test=64, threads=1, ema_decay=0.9)
    metrics = train_flow(settings)
    history = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["history"]
    assert history[0]["reason"] == "initial"
    assert metrics["validation_bpd"] < history[0]["validation_bpd"] - 0.05
    assert metrics["family"] == family and metrics["parameters"] > 0
    assert math.isfinite(metrics["test_bpd_dequantized"])
    flow, checkpoint = load_checkpoint_flow(tmp_path / "best.pt")
    assert checkpoint["family"] == family and not flow.training


def test_mutation_rate_replaces_about_that_fraction() -> None:
    pixels = torch.zeros(200, 1, 28, 28, dtype=torch.uint8)
    mutated = mutate_pixels(pixels, 0.2, torch.Generator().manual_seed(0))
    changed = (mutated != 0).float().mean().item()
    assert 0.19 < changed < 0.21  # P(replacement is non-zero) = 0.2 * 255/256
    assert torch.equal(mutate_pixels(pixels, 0.0, torch.Generator()), pixels)


def test_cli_train_resume_and_export(synthetic_image_dir: Path, tmp_path: Path) -> None:
    app, train_app, export_app = typer.Typer(), typer.Typer(), typer.Typer()
    register(train_app, export_app)
    app.add_typer(train_app, name="train")
    app.add_typer(export_app, name="export")
    runner = CliRunner()
    out = tmp_path / "run"
    common = ["train", "flow", "--family", "glow", "--preset", "tiny", "--data", str(synthetic_image_dir),
              "--out", str(out), "--batch-size", "32", "--limit-train", "64", "--limit-test", "32", "--threads", "1"]
    result = runner.invoke(app, [*common, "--epochs", "1"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*common, "--epochs", "2", "--resume"])
    assert result.exit_code == 0, result.output
    assert "resumed from" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs_completed"] == 2
    assert {"family", "parameters", "train_minutes", "test_bpd", "validation_bpd"} <= metrics.keys()
    result = runner.invoke(app, ["export", "flow", str(out / "best.pt"), "--out", str(tmp_path / "flow.onnx")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "flow.onnx").exists() and (tmp_path / "flow_sample.onnx").exists()


class ScaleAndFlatten(Transform):
    """z = 256 u flattened: log p(u) = sum(-(256 u)^2 / 2) + D log 256 - D/2 log(2 pi), analytic in u."""

    def forward(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = inputs.reshape(inputs.shape[0], -1)
        return 256.0 * flat, torch.full((inputs.shape[0],), flat.shape[1] * math.log(256.0))

    def inverse(self, outputs: torch.Tensor) -> torch.Tensor:
        return outputs / 256.0


def test_dequantised_bits_per_dim_is_the_expectation_over_uniform_noise_in_each_bin() -> None:
    """Black pixels: z = 256 u = v with v ~ U[0, 1) under dequantisation, 0.5 at the bin centre, so the
    dequantised bound exceeds the centre value by (E[v^2] - 0.25) / 2 = 1/24 nats, 1 / (24 ln 2) bits, per dim."""
    flow = Flow(ScaleAndFlatten(), (1, 4, 4))
    pixels = torch.zeros(2000, 1, 4, 4, dtype=torch.uint8)
    gap = evaluate_dequantized_bits_per_dim(flow, pixels, seed=3) - evaluate_bits_per_dim(flow, pixels)
    assert gap == pytest.approx(1.0 / (24.0 * math.log(2.0)), abs=0.006)  # MC error about 0.0012 bits
    assert evaluate_dequantized_bits_per_dim(flow, pixels, seed=3) == evaluate_dequantized_bits_per_dim(flow, pixels, seed=3)
