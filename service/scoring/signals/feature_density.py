"""Signal kind `feature_density`: class-conditional Gaussian density on classifier features (Mukhoti
et al. 2021, "Deep Deterministic Uncertainty"), numpy only: fitting and scoring.

On a distance-preserving (spectral-normalised) backbone, feature density falls with distance
from the training data; the OOD score is the negative log marginal density
`-log sum_c pi_c N(f; mu_c, Sigma_c)`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from oodserve.scoring.signals.base import (
    NO_ARRAYS,
    PARAMETERS_FILE_KEY,
    FittedSignal,
    ModelOutputs,
    SignalSource,
    read_output,
    register_signal_kind,
)

DEFAULT_PARAMETERS_FILE = "feature_density.npz"


@dataclass(frozen=True)
class GaussianMixtureParameters:
    """means (K, F), precision_cholesky (K, F, F) with Sigma_c^-1 = L_c L_c^T, log_normaliser (K,)
    holding log pi_c - 0.5 log det Sigma_c - 0.5 F log 2 pi."""

    means: np.ndarray
    precision_cholesky: np.ndarray
    log_normaliser: np.ndarray

    def as_arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """Flat name -> array mapping for storage in an `.npz` file."""
        return {
            f"{prefix}means": self.means,
            f"{prefix}precision_cholesky": self.precision_cholesky,
            f"{prefix}log_normaliser": self.log_normaliser,
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, np.ndarray] | np.lib.npyio.NpzFile, prefix: str) -> GaussianMixtureParameters:
        return cls(
            means=np.asarray(arrays[f"{prefix}means"], dtype=np.float64),
            precision_cholesky=np.asarray(arrays[f"{prefix}precision_cholesky"], dtype=np.float64),
            log_normaliser=np.asarray(arrays[f"{prefix}log_normaliser"], dtype=np.float64),
        )


def _precision_factor(covariance: np.ndarray) -> tuple[np.ndarray, float]:
    """`L` with Sigma^-1 = L L^T, and log det Sigma, for a positive-definite `covariance` (F, F)."""
    covariance_cholesky = np.linalg.cholesky(covariance)
    inverse_cholesky = np.linalg.inv(covariance_cholesky)  # Sigma^-1 = inv(C)^T inv(C)
    return inverse_cholesky.T, 2.0 * float(np.sum(np.log(np.diag(covariance_cholesky))))


def fit_class_conditional_gaussians(
    features: np.ndarray, labels: np.ndarray, n_classes: int, jitter: float = 1e-4, shared_covariance: bool = False
) -> GaussianMixtureParameters:
    """Maximum-likelihood Gaussian per class on `features` (N, F) with `labels` (N,).

    `jitter` (relative to the mean feature variance) keeps each covariance positive definite. With
    `shared_covariance` the classes share their pooled within-class covariance (linear discriminant
    analysis), stored once: `precision_cholesky` is then (1, F, F), which keeps wide features small.
    """
    features = np.asarray(features, dtype=np.float64)
    dim = features.shape[1]
    ridge = jitter * float(np.mean(np.var(features, axis=0))) + 1e-12
    means, priors, covariances = [], [], []
    for label in range(n_classes):
        members = features[labels == label]
        if len(members) < 2:
            raise ValueError(f"class {label} has {len(members)} examples; need at least 2")
        means.append(members.mean(axis=0))
        priors.append(len(members) / len(features))
        covariances.append(np.cov(members, rowvar=False))
    if shared_covariance:
        pooled = sum(prior * covariance for prior, covariance in zip(priors, covariances)) + ridge * np.eye(dim)
        factor, log_det = _precision_factor(pooled)
        factors, log_dets = [factor], [log_det] * n_classes
    else:
        pairs = [_precision_factor(covariance + ridge * np.eye(dim)) for covariance in covariances]
        factors, log_dets = [pair[0] for pair in pairs], [pair[1] for pair in pairs]
    log_normaliser = np.log(np.asarray(priors)) - 0.5 * np.asarray(log_dets) - 0.5 * dim * np.log(2.0 * np.pi)
    return GaussianMixtureParameters(np.stack(means), np.stack(factors), log_normaliser)


def negative_log_feature_density(features: np.ndarray, parameters: GaussianMixtureParameters) -> np.ndarray:
    """`-log sum_c pi_c N(f; mu_c, Sigma_c)` for `features` (N, F) -> (N,), higher = more OOD."""
    features = np.asarray(features, dtype=np.float64)
    centred = features[:, None, :] - parameters.means[None, :, :]  # (N, K, F)
    if parameters.precision_cholesky.shape[0] == 1:  # one shared covariance
        whitened = centred @ parameters.precision_cholesky[0]
    else:
        whitened = np.einsum("nkf,kfg->nkg", centred, parameters.precision_cholesky)
    log_joint = parameters.log_normaliser[None, :] - 0.5 * np.sum(whitened**2, axis=-1)  # (N, K)
    peak = log_joint.max(axis=1, keepdims=True)
    return -(peak[:, 0] + np.log(np.exp(log_joint - peak).sum(axis=1)))


def _features(outputs: ModelOutputs, source: SignalSource) -> np.ndarray:
    features = np.asarray(read_output(outputs, source), dtype=np.float64)
    return features.reshape(features.shape[0], -1)


def fit_feature_density(
    outputs: ModelOutputs, images: np.ndarray, source: SignalSource, options: Mapping[str, Any], labels: np.ndarray | None
) -> FittedSignal:
    """One Gaussian per class of `labels` (N,) on the reference features (N, F); without labels (or with
    option `class_conditional` false), one Gaussian for all; option `shared_covariance` true pools the classes'
    covariance. The arrays go to the bundle's parameters file (option `parameters_file`, default feature_density.npz)."""
    features = _features(outputs, source)
    if labels is None or not options.get("class_conditional", True):
        classes, n_classes = np.zeros(len(features), dtype=np.int64), 1
    else:
        classes = np.asarray(labels, dtype=np.int64)
        n_classes = int(classes.max()) + 1
    mixture = fit_class_conditional_gaussians(features, classes, n_classes, shared_covariance=bool(options.get("shared_covariance", False)))
    prefix = str(options.get("prefix", ""))
    params = {PARAMETERS_FILE_KEY: DEFAULT_PARAMETERS_FILE, **options}
    return FittedSignal(params, mixture.as_arrays(prefix))


def _validate(params: Mapping[str, Any], input_shape: Sequence[int]) -> None:
    if not isinstance(params.get(PARAMETERS_FILE_KEY), str):
        raise ValueError(f"params.{PARAMETERS_FILE_KEY} must name the bundle's .npz of Gaussian parameters")


@register_signal_kind(
    "feature_density",
    description="-log sum_c pi_c N(f; mu_c, Sigma_c) of classifier features (Mukhoti et al. 2021, DDU)",
    fit=fit_feature_density,
    required_params=(PARAMETERS_FILE_KEY,),
    validate=_validate,
)
def feature_density_signal(
    outputs: ModelOutputs,
    images: np.ndarray,
    source: SignalSource,
    params: Mapping[str, Any],
    *,
    arrays: Mapping[str, np.ndarray] = NO_ARRAYS,
    prepared: np.ndarray | None = None,
) -> np.ndarray:
    """Negative log density of the (N, F) feature output under the fitted class-conditional Gaussians. (N,) float64."""
    mixture = GaussianMixtureParameters.from_arrays(arrays, prefix=str(params.get("prefix", "")))
    return negative_log_feature_density(_features(outputs, source), mixture)
