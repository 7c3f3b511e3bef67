"""Conformal p-values of OOD scores against sorted in-distribution calibration scores (Vovk et al. 2005)."""

from __future__ import annotations

import numpy as np

from oodserve.bundle.calibration import sort_calibration_scores  # noqa: F401  (re-exported: checked where loaded)


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
    return (1.0 + count_at_least(calibration, scores)) / (calibration.size + 1.0)


class StackedCalibration:
    """The sorted calibration scores of K signals in one array, so the p-values of all K signals of a batch
    come from one `np.searchsorted` instead of K.

    Signal k's scores are stored as the complex keys k + i*score: numpy orders complex numbers by real
    part, then imaginary part, so the keys sort as (signal, score) and signal k occupies the block
    [offsets[k], offsets[k+1]). A score s of signal k lands at position offsets[k] + #{calibration_k < s},
    which gives exactly `conformal_p_values(calibration_k, s)`. Both parts of a complex128 are float64, so
    no score is rounded.
    """

    def __init__(self, sorted_calibration_scores: list[np.ndarray]) -> None:
        """sorted_calibration_scores: K ascending float64 arrays (n_k,) (see `sort_calibration_scores`)."""
        if not sorted_calibration_scores:
            raise ValueError("a stacked calibration needs at least one signal")
        sizes = np.array([scores.size for scores in sorted_calibration_scores], dtype=np.int64)
        self.signal_count = len(sorted_calibration_scores)
        self.sizes = sizes.astype(np.float64)[:, None]
        """(K, 1) calibration sizes n_k."""
        self.ends = np.cumsum(sizes).astype(np.float64)[:, None]
        """(K, 1) end of each signal's block in the stacked keys."""
        self._row_index = np.arange(self.signal_count, dtype=np.float64)[:, None]
        self._keys = _complex_keys(
            np.repeat(np.arange(self.signal_count, dtype=np.float64), sizes),
            np.concatenate([np.asarray(scores, dtype=np.float64) for scores in sorted_calibration_scores]),
        )

    def p_values(self, scores: np.ndarray) -> np.ndarray:
        """scores: (K, N), row k scored by signal k -> (K, N) conformal p-values, row k equal to
        `conformal_p_values(calibration_k, scores[k])` (non-finite scores read as +inf, the most OOD)."""
        values = as_non_conformity(scores)
        if values.ndim != 2 or values.shape[0] != self.signal_count:
            raise ValueError(f"expected scores of shape ({self.signal_count}, N), got {list(values.shape)}")
        keys = _complex_keys(np.broadcast_to(self._row_index, values.shape), values)
        count_at_least = self.ends - np.searchsorted(self._keys, keys, side="left")
        return (1.0 + count_at_least) / (self.sizes + 1.0)


def _complex_keys(real: np.ndarray, imaginary: np.ndarray) -> np.ndarray:
    """real + i*imaginary, part by part (`1j * inf` would make the real part NaN)."""
    keys = np.empty(imaginary.shape, dtype=np.complex128)
    keys.real = real
    keys.imag = imaginary
    return keys


def count_at_least(sorted_calibration_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """#{calibration >= s} (N,) int64 for every score s (non-finite scores read as +inf)."""
    calibration = np.asarray(sorted_calibration_scores, dtype=np.float64)
    return calibration.size - np.searchsorted(calibration, as_non_conformity(scores), side="left")


def conditional_p_values(adjusted: np.ndarray, sorted_calibration_scores: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Calibration-conditional p-values (Bates et al. 2023): `adjusted[c]` for c = #{calibration >= s}.

    adjusted: (m + 1,) non-decreasing, from `oodserve.models.build.conditional`: with probability >= 1 - delta over
    the draw of the m calibration scores, P(adjusted[c(X)] <= alpha | calibration) <= alpha for every alpha at once.
    Returns (N,) float64.
    """
    return np.asarray(adjusted, dtype=np.float64)[count_at_least(sorted_calibration_scores, scores)]
