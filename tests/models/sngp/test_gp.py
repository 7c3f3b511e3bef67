"""Random-feature GP layer: variance formula, mean-field logits, per-epoch exact precision."""

from __future__ import annotations

import math

import torch

from oodserve.models.sngp.backbone import SNGPClassifier, SNGPConfig
from oodserve.models.sngp.gp import RandomFeatureGaussianProcess, mean_field_logits, predictive_variance
from oodserve.models.sngp.train import TrainSettings, train_one_epoch


def test_variance_is_the_diagonal_of_ridge_phi_sigma_phi() -> None:
    torch.manual_seed(0)
    features = torch.randn(6, 8)
    root = torch.randn(8, 8)
    covariance = root @ root.t() + torch.eye(8)
    expected = 0.5 * torch.diagonal(features @ covariance @ features.t())
    assert torch.allclose(predictive_variance(features, covariance, 0.5), expected, rtol=1e-5)


def test_mean_field_logits_shrink_by_the_probit_factor() -> None:
    logits = torch.tensor([[2.0, -1.0], [4.0, 0.0]])
    variance = torch.tensor([0.0, 8.0 / math.pi])
    expected = torch.tensor([[2.0, -1.0], [4.0 / math.sqrt(2.0), 0.0]])
    assert torch.allclose(mean_field_logits(logits, variance), expected)


def test_random_features_have_the_rff_form_and_fixed_parameters() -> None:
    layer = RandomFeatureGaussianProcess(5, 3, num_random_features=16, lengthscale=2.0)
    hidden = torch.randn(4, 5)
    expected = math.sqrt(2.0 / 16) * torch.cos(layer.input_norm(hidden) @ layer.frequencies.t() + layer.phases)
    assert torch.allclose(layer.random_features(hidden), expected)
    trainable = {name for name, parameter in layer.named_parameters()}
    assert "frequencies" not in trainable and "phases" not in trainable
    assert bool((layer.phases >= 0).all() and (layer.phases <= 2 * math.pi).all())


def test_precision_is_reset_each_epoch_and_summed_exactly_over_the_last() -> None:
    torch.manual_seed(0)
    config = SNGPConfig(widths=(2, 2, 4), num_random_features=32, ridge=0.7, image_size=8)
    model = SNGPClassifier(config)
    images, labels = torch.randn(40, 1, 8, 8), torch.randint(0, 10, (40,))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    settings = TrainSettings(batch_size=16, flip=False)
    recorded: list[torch.Tensor] = []
    original_accumulate = model.gp.accumulate_precision

    def recording_accumulate(features: torch.Tensor) -> None:
        recorded.append(features.detach().double().clone())
        original_accumulate(features)

    model.gp.accumulate_precision = recording_accumulate  # type: ignore[method-assign]
    generator = torch.Generator().manual_seed(0)
    for epoch in range(2):
        recorded.clear()
        train_one_epoch(model, images, labels, optimizer, None, settings, generator, math.inf, f"epoch {epoch}")
    phi = torch.cat(recorded)
    assert phi.shape == (40, 32)  # only the last epoch's 40 rows
    expected = 0.7 * torch.eye(32, dtype=torch.float64) + phi.t() @ phi
    assert torch.allclose(model.gp.precision, expected, rtol=0, atol=1e-12)
    model.gp.update_covariance()
    assert torch.allclose(model.gp.covariance.double() @ expected, torch.eye(32, dtype=torch.float64), atol=1e-4)
