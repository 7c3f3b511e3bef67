"""Scoring helpers of the SNGP evaluation: Gaussian densities, DDU score, detection metrics, ECE."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from oodserve.models.sngp.evaluate import density_score, detection_metrics, fit_class_gaussians, gaussian_log_densities
from oodserve.models.sngp.train import expected_calibration_error


def test_gaussian_log_densities_match_scipy() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(5, 3))
    means = rng.normal(size=(2, 3))
    roots = rng.normal(size=(2, 3, 3))
    covariances = roots @ roots.transpose(0, 2, 1) + np.eye(3)
    got = gaussian_log_densities(features, means, covariances)
    for c in range(2):
        expected = multivariate_normal(means[c], covariances[c]).logpdf(features)
        np.testing.assert_allclose(got[:, c], expected, rtol=1e-10)


def test_density_score_is_higher_far_from_the_class_means() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 200)
    features = rng.normal(size=(400, 2)) + np.where(labels[:, None] == 0, -3.0, 3.0)
    for tied in (False, True):
        means, covariances = fit_class_gaussians(features, labels, tied=tied)
        near = density_score(np.array([[-3.0, -3.0], [3.0, 3.0], [30.0, -30.0]]), means, covariances)
        assert near[2] > max(near[0], near[1]) + 100


def test_detection_metrics_on_separated_and_identical_scores() -> None:
    perfect = detection_metrics(np.zeros(50), np.ones(50))
    assert perfect["auroc"] == 1.0 and perfect["fpr_at_95_tpr"] == 0.0
    assert detection_metrics(np.arange(100.0), np.arange(100.0))["auroc"] == pytest.approx(0.5)


def test_ece_of_perfectly_calibrated_and_overconfident_predictions() -> None:
    labels = np.array([0, 0, 1, 1])
    confident_right = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    assert expected_calibration_error(confident_right, labels) == pytest.approx(0.0)
    confident_wrong = confident_right[::-1]
    assert expected_calibration_error(confident_wrong, labels) == pytest.approx(1.0)
