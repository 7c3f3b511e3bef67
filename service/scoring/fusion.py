"""Fusion of per-signal conformal p-values into one statistic (higher = more OOD).

The fused statistic is itself turned into a conformal p-value against fused statistics of a
separate calibration split, which keeps the false-positive guarantee (design.md section 4).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

FusionFunction = Callable[[np.ndarray], np.ndarray]


def fisher_statistic(p_values: np.ndarray) -> np.ndarray:
    """Fisher's combination -2 * sum_k log p_k (Fisher 1925). p_values: (N, K) in (0, 1] -> (N,)."""
    return -2.0 * np.sum(np.log(p_values), axis=1)


def min_p_statistic(p_values: np.ndarray) -> np.ndarray:
    """Tippett's minimum-p combination -log min_k p_k. p_values: (N, K) in (0, 1] -> (N,)."""
    return -np.log(np.min(p_values, axis=1))


FUSION_METHODS: dict[str, FusionFunction] = {
    "fisher": fisher_statistic,
    "min_p": min_p_statistic,
}


def fused_statistic(method: str, p_values_by_signal: Mapping[str, np.ndarray], signal_names: Sequence[str]) -> np.ndarray:
    """Stack the named signals' (N,) p-values into (N, K) and apply the fusion `method` -> (N,) float64."""
    if method not in FUSION_METHODS:
        raise ValueError(f"unknown fusion method {method!r}; known: {sorted(FUSION_METHODS)}")
    stacked = np.stack([np.asarray(p_values_by_signal[name], dtype=np.float64) for name in signal_names], axis=1)
    return FUSION_METHODS[method](stacked)
