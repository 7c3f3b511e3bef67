"""A bundle's calibration scores as data: sorted, finite, 1-D float64 arrays per signal and of the fused statistic.

The conformal p-values computed from them live in `oodserve.scoring` (`scoring.pipeline.Calibration`); this module is
what the loader checks and returns, so the bundle layer needs nothing of scoring.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

FUSED_CALIBRATION_KEY = "__fused__"
"""Name of the calibration array holding fused statistics of the second calibration split."""
CONDITIONAL_KEY = "__conditional__"
"""Name of the (m + 1,) array of calibration-conditional p-values of a bundle with the conditional guarantee."""
HELD_OUT_PREFIX = "__held_out__."
"""Prefix of a cross-conformal bundle's held-out arrays: `__held_out__.<fold signal>` are the scores of the fold's own
rows under the fold's models; `__fused__.fold<k>` (see `fold_name`) the fold's held-out fused statistics."""


def fold_name(name: str, fold: int) -> str:
    """The name of signal (or model, or array) `name` of fold `fold` in a cross-conformal bundle: `name.fold<k>`."""
    return f"{name}.fold{fold}"


def rank_calibration(count: int) -> np.ndarray:
    """(count,) the scores 0.5, 1.5, ..., count - 0.5: against them an integer rank r in 0..count (how many of `count`
    calibration statistics an input's statistic exceeds) has the conformal p-value (1 + count - r) / (count + 1), the
    cross-conformal p-value (`oodserve.scoring.cross_conformal`). It stands in for a cross-conformal bundle's fused
    calibration wherever fused scores are ranked (drift tests, the smallest alpha)."""
    return np.arange(count, dtype=np.float64) + 0.5


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
    """Sorted in-distribution calibration scores: (n_k,) per signal and (m,) fused statistics.

    A split bundle (`folds` 0) has held-out scores per signal and of the fused statistic. A cross-conformal bundle
    (`folds` K >= 2) has, per fold signal, the scores that standardise it (`per_signal`, rows of the fold's own
    training side), its held-out rows' scores (`held_out`, by fold signal) and the fold's held-out fused statistics
    (`fused_by_fold`, K arrays); `fused` is then `rank_calibration(n)` for the n held-out rows of all folds.
    `conditional` (m + 1,), when present, maps c = #{fused calibration >= statistic} to the calibration-conditional
    p-value (Bates et al. 2023)."""

    per_signal: Mapping[str, np.ndarray]
    fused: np.ndarray
    folds: int = 0
    held_out: Mapping[str, np.ndarray] = field(default_factory=dict)
    fused_by_fold: tuple[np.ndarray, ...] = ()
    conditional: np.ndarray | None = None

    @property
    def minimum_p_value(self) -> float:
        """The smallest fused p-value the bundle can give: 1 / (m + 1) for m fused calibration scores, or the
        smallest calibration-conditional p-value. An alpha at or below it flags nothing, whatever the input."""
        return float(self.conditional[0]) if self.conditional is not None else 1.0 / (self.fused.size + 1.0)
