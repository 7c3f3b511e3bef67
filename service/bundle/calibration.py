"""A bundle's calibration scores as data: sorted, finite, 1-D float64 arrays per signal and of the fused statistic.

The conformal p-values computed from them live in `oodserve.scoring` (`scoring.pipeline.Calibration`); this module is
what the loader checks and returns, so the bundle layer needs nothing of scoring.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

FUSED_CALIBRATION_KEY = "__fused__"
"""Name of the calibration array holding fused statistics of the second calibration split."""


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


@dataclass(frozen=True)
class CalibrationScores:
    """Sorted in-distribution calibration scores: (n_k,) per signal and (m,) fused statistics."""

    per_signal: Mapping[str, np.ndarray]
    fused: np.ndarray
