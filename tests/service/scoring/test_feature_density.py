"""Class-conditional Gaussian feature density (DDU) against scipy, and its signal kind."""

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from oodserve.scoring.signals import SIGNAL_KINDS, SignalSource
from oodserve.scoring.signals.feature_density import (
    GaussianMixtureParameters,
    fit_class_conditional_gaussians,
    negative_log_feature_density,
)


@pytest.fixture
def clustered_features():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    features = rng.normal(size=(600, 4)) + 4.0 * labels[:, None]
    return features, labels


def test_matches_scipy_mixture(clustered_features):
    features, labels = clustered_features
    parameters = fit_class_conditional_gaussians(features, labels, n_classes=3, jitter=0.0)
    queries = np.random.default_rng(1).normal(size=(7, 4)) * 3
    expected = []
    for query in queries:
        density = sum(
            np.mean(labels == c)
            * multivariate_normal(features[labels == c].mean(0), np.cov(features[labels == c], rowvar=False)).pdf(query)
            for c in range(3)
        )
        expected.append(-np.log(density))
    np.testing.assert_allclose(negative_log_feature_density(queries, parameters), expected, rtol=1e-9)


def test_shared_covariance_matches_scipy_mixture_with_the_pooled_covariance(clustered_features):
    features, labels = clustered_features
    parameters = fit_class_conditional_gaussians(features, labels, n_classes=3, jitter=0.0, shared_covariance=True)
    assert parameters.precision_cholesky.shape == (1, 4, 4)
    priors = [np.mean(labels == c) for c in range(3)]
    pooled = sum(prior * np.cov(features[labels == c], rowvar=False) for c, prior in enumerate(priors))
    queries = np.random.default_rng(2).normal(size=(7, 4)) * 3
    expected = [
        -np.log(sum(prior * multivariate_normal(features[labels == c].mean(0), pooled).pdf(query) for c, prior in enumerate(priors)))
        for query in queries
    ]
    np.testing.assert_allclose(negative_log_feature_density(queries, parameters), expected, rtol=1e-9)


def test_grows_with_distance_from_the_data(clustered_features):
    features, labels = clustered_features
    parameters = fit_class_conditional_gaussians(features, labels, n_classes=3)
    direction = np.ones(4) / 2.0
    scores = [negative_log_feature_density(features.mean(0, keepdims=True) + r * direction, parameters)[0] for r in (10, 20, 40)]
    assert scores[0] < scores[1] < scores[2]


def test_arrays_round_trip_and_signal_kind(clustered_features):
    features, labels = clustered_features
    parameters = fit_class_conditional_gaussians(features, labels, n_classes=3)
    arrays = parameters.as_arrays("ddu_")
    restored = GaussianMixtureParameters.from_arrays(arrays, "ddu_")
    kind = SIGNAL_KINDS["feature_density"]
    outputs = {"clf": {"features": features[:5].astype(np.float32)}}
    values = kind.score(outputs, np.zeros((5, 1, 2, 2)), SignalSource("clf", "features"),
                          {"parameters_file": "f.npz", "prefix": "ddu_"}, arrays=arrays)
    np.testing.assert_allclose(values, negative_log_feature_density(features[:5].astype(np.float32), restored))


def test_class_with_too_few_examples_is_refused():
    with pytest.raises(ValueError, match="class 1"):
        fit_class_conditional_gaussians(np.zeros((3, 2)), np.array([0, 0, 1]), n_classes=2)
