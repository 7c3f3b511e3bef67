"""Distance awareness on two moons: SNGP variance far from the data >> variance on the data (Liu et al. 2020, Fig. 1)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import make_moons

from oodserve.models.sngp.backbone import ResidualMLP
from oodserve.models.sngp.gp import RandomFeatureGaussianProcess


def test_variance_grows_far_from_the_training_data() -> None:
    torch.manual_seed(0)
    points, labels = make_moons(n_samples=600, noise=0.1, random_state=0)
    inputs = torch.tensor(points, dtype=torch.float32)
    targets = torch.tensor(labels)
    body = ResidualMLP(2, 64, depth=3, spectral_bound=0.95)
    head = RandomFeatureGaussianProcess(64, 2, num_random_features=256, ridge=1.0, lengthscale=2.0)
    optimizer = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-2)
    body.train(), head.train()
    for _ in range(150):
        head.reset_precision()  # one full-batch step = one epoch
        logits, _, _ = head(body(inputs))
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    head.update_covariance()
    body.eval(), head.eval()
    with torch.no_grad():
        logits, data_variance, _ = head(body(inputs))
        angles = torch.linspace(0, 2 * math.pi, 200)
        radii = torch.linspace(10, 20, 200)
        far = torch.stack([radii * torch.cos(angles), radii * torch.sin(angles)], dim=1) + torch.tensor([0.5, 0.25])
        _, far_variance, _ = head(body(far))
    accuracy = float((logits.argmax(1) == targets).float().mean())
    assert accuracy > 0.95
    assert float(far_variance.mean()) >= 10 * float(data_variance.mean())
    assert float(np.median(far_variance.numpy())) >= 10 * float(np.median(data_variance.numpy()))
