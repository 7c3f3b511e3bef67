"""Conformal p-values of OOD scores against sorted in-distribution calibration scores (Vovk et al. 2005)."""

from __future__ import annotations

import numpy as np


def sort_calibration_scores(calibration_scores: np.ndarray) -> np.ndarray:
    """Return the calibration scores as a sorted, contiguous 1-D float64 array.

    Refuses empty, non 1-D or non-finite arrays: every conformal guarantee rests on them.
    """
    scores = np.asarray(calibration_scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"calibration scores must be 1-D, got shape {list(scores.shape)}")
    if scores.size == 0:
        raise ValueError("calibration scores are empty")
    if not np.all(np.isfinite(scores)):
        raise ValueError("calibration scores contain NaN or infinite values")
    return np.ascontiguousarray(np.sort(scores))


def as_non_conformity(scores: np.ndarray) -> np.ndarray:
    """Scores (N,) as float64 with every non-finite value (NaN, +inf, -inf) replaced by +inf, the most OOD."""
    values = np.asarray(scores, dtype=np.float64)
    return np.where(np.isfinite(values), values, np.inf)


def conformal_p_values(sorted_calibration_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """p = (1 + #{calibration >= s}) / (n + 1) for every score s (higher score = more OOD).

    sorted_calibration_scores: (n,) ascending float64 (see `sort_calibration_scores`).
    scores: (N,) test scores. Ties count as ">=", so a score equal to every calibration score
    gets p = 1 and a score above all of them gets p = 1 / (n + 1). Every non-finite score (NaN,
    +inf and -inf alike) is treated as +inf, maximally OOD: a model that cannot score an input, or
    gives it an infinite log-density, has no evidence it is in-distribution, and -inf must never
    read as the most typical input there is.
    Returns (N,) float64 in [1/(n+1), 1].
    """
    calibration = np.asarray(sorted_calibration_scores, dtype=np.float64)
    values = as_non_conformity(scores)
    count_at_least = calibration.size - np.searchsorted(calibration, values, side="left")
    return (1.0 + count_at_least) / (calibration.size + 1.0)
