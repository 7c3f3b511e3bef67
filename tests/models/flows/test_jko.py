"""The JKO schedule: stage partition, and on a 2-D toy that each proximal step moves the data less than the one
before while the pushed-forward density approaches the standard normal target; plus `train flow --schedule jko`."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from oodserve.models.flows.base import standard_normal_log_prob
from oodserve.models.flows.jko import jko_stages, stage_objective, stage_parameters, transport_cost
from oodserve.models.flows.tabular import TabularFlowConfig, build_tabular_flow
from oodserve.models.flows.train import FlowData, TrainSettings, train_flow
from oodserve.models.flows.zoo import build_flow, preset_config


def two_moons(count: int, generator: torch.Generator) -> torch.Tensor:
    """A curved 2-D density (two half circles with noise), standardised-ish: far from the normal target."""
    angle = torch.rand(count, generator=generator) * math.pi
    upper = torch.rand(count, generator=generator) < 0.5
    x = torch.where(upper, torch.cos(angle), 1.0 - torch.cos(angle))
    y = torch.where(upper, torch.sin(angle), 0.5 - torch.sin(angle))
    points = torch.stack([x - 0.5, y - 0.25], dim=1) * 2.0
    return points + 0.1 * torch.randn(count, 2, generator=generator)


def test_stages_cover_every_transform_once() -> None:
    flow = build_flow("iresnet", {**preset_config("iresnet", "tiny"), "input_shape": (1, 28, 28)})
    stages = jko_stages(flow)
    assert len(stages) == 2  # one per residual block
    covered = [index for stage in stages for index in stage]
    assert covered == list(range(len(flow.transform.transforms)))
    assert len(jko_stages(flow, 1)) == 1
    with pytest.raises(ValueError, match="between 1 and"):
        jko_stages(flow, 3)


def test_each_jko_step_moves_less_and_the_density_approaches_the_target() -> None:
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    flow = build_tabular_flow(TabularFlowConfig(features=2, couplings=6, hidden_features=32, hidden_layers=2))
    stages = jko_stages(flow)
    assert len(stages) == 6
    test_points = two_moons(4000, torch.Generator().manual_seed(1))

    def negative_log_likelihood() -> float:
        with torch.no_grad():
            return float(-flow.log_prob(test_points).mean())

    start_nll = negative_log_likelihood()
    transports, nlls = [], []
    for stage in stages:
        optimizer = torch.optim.Adam(stage_parameters(flow, stage), lr=5e-3)
        for _ in range(300):
            loss, _, _ = stage_objective(flow, stage, two_moons(256, generator), step_size=0.5)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            _, _, transport = stage_objective(flow, stage, test_points, step_size=0.5)
        transports.append(float(transport) * 2)  # per point (the objective divides by D = 2)
        nlls.append(negative_log_likelihood())
    # the proximal steps shrink: later steps transport less than earlier ones
    assert transports[-1] < 0.5 * transports[0], transports
    assert all(later <= earlier * 1.25 for earlier, later in zip(transports, transports[1:])), transports
    # and the density approaches the target: test NLL falls toward that of a well-fitted flow
    assert nlls[-1] < start_nll - 0.5, (start_nll, nlls)
    assert nlls[-1] < nlls[0], nlls
    with torch.no_grad():
        latent, _ = flow.transform(test_points)
    # the pushed-forward points look standard normal: mean ~ 0, covariance ~ I, log-density near N(0, I)'s entropy
    assert float(latent.mean(0).abs().max()) < 0.2
    assert float((torch.cov(latent.T) - torch.eye(2)).abs().max()) < 0.3
    assert abs(float(standard_normal_log_prob(latent).mean()) + (1 + math.log(2 * math.pi))) < 0.3
    assert transport_cost(flow, test_points) == pytest.approx(sum(transports), rel=0.05)


def test_train_flow_with_the_jko_schedule(tmp_path: Path) -> None:

    images = np.random.default_rng(0).integers(0, 256, size=(160, 1, 8, 8)).astype(np.uint8)
    settings = TrainSettings(family="iresnet", preset="tiny", out=str(tmp_path), epochs=2, batch_size=40, threads=1, schedule="jko",
                             jko_step_size=0.5, snapshot_minutes=(0.0,))
    metrics = train_flow(settings, FlowData(images[:120], images[120:140], images[140:]))
    assert metrics["schedule"] == "jko" and metrics["jko_steps"] == 2 and metrics["test_transport_cost"] > 0
    assert (tmp_path / "snapshot-0min.pt").exists()
    with pytest.raises(ValueError, match="joint or jko"):
        train_flow(TrainSettings(family="iresnet", preset="tiny", out=str(tmp_path / "bad"), epochs=1, schedule="nope"),
                   FlowData(images[:120], images[120:140], images[140:]))
