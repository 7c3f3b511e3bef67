"""OOD detection metrics (scikit-learn based) with in-distribution as the negative class."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from oodserve.stats import clopper_pearson  # noqa: F401  (re-exported: evaluation reports use it)


@dataclass(frozen=True)
class DetectionMetrics:
    """AUROC, AUPR (OOD positive) and FPR at 95% TPR of one continuous score."""

    auroc: float
    aupr: float
    fpr_at_95_tpr: float


def _labels_and_scores(in_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Labels (in 0, OOD 1) and scores with NaN and +inf ranked above every finite score and -inf below
    (the service's p-values treat NaN as maximally OOD too)."""
    in_scores = np.asarray(in_scores, dtype=np.float64)
    ood_scores = np.asarray(ood_scores, dtype=np.float64)
    labels = np.concatenate([np.zeros(len(in_scores)), np.ones(len(ood_scores))])
    scores = np.concatenate([in_scores, ood_scores])
    finite = scores[np.isfinite(scores)]
    low, high = (finite.min() - 1.0, finite.max() + 1.0) if finite.size else (-1.0, 1.0)
    return labels, np.nan_to_num(scores, nan=high, posinf=high, neginf=low)


def auroc(in_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Area under the ROC curve of scores (higher = more OOD), ties counted half (Mann-Whitney)."""
    labels, scores = _labels_and_scores(in_scores, ood_scores)
    return float(roc_auc_score(labels, scores))


def fpr_at_tpr(in_scores: np.ndarray, ood_scores: np.ndarray, tpr_level: float = 0.95) -> float:
    """Fraction of in-distribution inputs flagged when the threshold catches `tpr_level` of the OOD ones."""
    labels, scores = _labels_and_scores(in_scores, ood_scores)
    fpr, tpr, _ = roc_curve(labels, scores)
    return float(fpr[np.searchsorted(tpr, tpr_level, side="left")])


def detection_metrics(in_scores: np.ndarray, ood_scores: np.ndarray) -> DetectionMetrics:
    """Scores are oriented so that higher means more OOD."""
    labels, scores = _labels_and_scores(in_scores, ood_scores)
    return DetectionMetrics(
        auroc=auroc(in_scores, ood_scores),
        aupr=float(average_precision_score(labels, scores)),
        fpr_at_95_tpr=fpr_at_tpr(in_scores, ood_scores),
    )


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """ECE with `bins` equal-width confidence bins (Guo et al. 2017): sum_b |B|/n |acc_b - conf_b|.

    probabilities: (N, K), labels: (N,).
    """
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    error = 0.0
    for low, high in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > low) & (confidence <= high)
        if in_bin.any():
            error += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(error)


