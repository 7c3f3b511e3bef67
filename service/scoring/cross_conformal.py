"""Cross-conformal p-values (Vovk 2015, "Cross-conformal predictors"; Barber, Candès, Ramdas and Tibshirani 2021,
"Predictive inference with the jackknife+"; Hennhöfer and Preisach 2024, "Leave-one-out-, bootstrap- and
cross-conformal anomaly detectors").

The n in-distribution rows are split into K folds. Fold k's models and score function s_k are fitted without fold k,
and score fold k's own rows: C_k (n_k,), sum n_k = n. A new input x gets, from every fold's score function,

    c(x) = sum_k #{i in fold k : C_k[i] >= s_k(x)},        p(x) = (1 + c(x)) / (n + 1).

Every row serves in training (K - 1 times) and calibration (once). The guarantee is that of the jackknife+/CV+
(Barber et al. 2021, Theorems 1 and 4, with the anomaly-detection reading of Hennhöfer and Preisach 2024): for an
in-distribution x exchangeable with the n rows and a fitting procedure symmetric in its training rows,
P(p(x) <= alpha) <= 2 alpha + min(2 (1 - 1/K) / (n/K + 1), (1 - K/n) / (K + 1)) in the worst case
(`worst_case_rate`), and about alpha in practice: when the fold models are stable (a few rows more or less move
their scores little) it approaches the split-conformal alpha (Barber et al. 2021, section 5; the audit in
benchmarks/fpr_audit.py measures it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from oodserve.scoring.conformal import as_non_conformity, conformal_p_values, count_at_least


def cross_conformal_counts(sorted_fold_scores: Sequence[np.ndarray], fold_statistics: Sequence[np.ndarray]) -> np.ndarray:
    """c(x) = sum_k #{C_k >= s_k(x)} for every input.

    sorted_fold_scores: K ascending float64 arrays C_k (n_k,), fold k's held-out scores under fold k's score function;
    fold_statistics: K arrays (N,), s_k of each input (non-finite values read as +inf, the most OOD).
    Returns (N,) int64 in 0..n.
    """
    if len(sorted_fold_scores) != len(fold_statistics) or not sorted_fold_scores:
        raise ValueError(f"need one statistic array per fold: {len(sorted_fold_scores)} folds, {len(fold_statistics)} arrays")
    counts = np.zeros(np.shape(fold_statistics[0]), dtype=np.int64)
    for calibration, statistic in zip(sorted_fold_scores, fold_statistics):
        counts += count_at_least(calibration, statistic)
    return counts


def cross_conformal_p_values(sorted_fold_scores: Sequence[np.ndarray], fold_statistics: Sequence[np.ndarray]) -> np.ndarray:
    """p(x) = (1 + c(x)) / (n + 1), n = sum_k n_k (see `cross_conformal_counts`). Returns (N,) float64 in [1/(n+1), 1]."""
    total = sum(calibration.size for calibration in sorted_fold_scores)
    return (1.0 + cross_conformal_counts(sorted_fold_scores, fold_statistics)) / (total + 1.0)


def worst_case_rate(alpha: float, rows: int, folds: int) -> float:
    """The CV+ bound on the false-positive rate at level alpha with n = `rows` rows in K = `folds` folds (Barber et al.
    2021, Theorem 4): 2 alpha + min(2 (1 - 1/K) / (n/K + 1), (1 - K/n) / (K + 1))."""
    slack = min(2.0 * (1.0 - 1.0 / folds) / (rows / folds + 1.0), (1.0 - folds / rows) / (folds + 1.0))
    return 2.0 * alpha + slack


SMALLEST_P_VALUE = 1e-300
"""Floor of a tail-extended p-value, so its logarithm stays finite."""


def tail_scale(sorted_reference: np.ndarray) -> float:
    """Spread of a fold signal's standardising scores (n,) beyond which `tail_extended_p_values` decays by e:
    max - median, else the standard deviation, else 1."""
    reference = np.asarray(sorted_reference, dtype=np.float64)
    for spread in (reference[-1] - np.median(reference), np.std(reference)):
        if np.isfinite(spread) and spread > 0:
            return float(spread)
    return 1.0


def tail_extended_p_values(sorted_reference: np.ndarray, scores: np.ndarray, p_values: np.ndarray | None = None) -> np.ndarray:
    """A fold's standardised signal: the conformal p-value against its standardising scores (n,), times
    exp(-(s - max) / `tail_scale`) for scores beyond their maximum, floored at `SMALLEST_P_VALUE`.

    With a few standardising rows the plain p-value stops at 1/(n + 1) for everything beyond them, so a far outlier and
    a held-out row just past the maximum would tie and the fused statistic could not separate them; the exponential
    tail keeps it growing. Any function of the fold's own training side keeps the cross-conformal guarantee, so
    this shapes power, not validity. `p_values`: the plain p-values when already computed. Returns (N,) float64.
    """
    reference = np.asarray(sorted_reference, dtype=np.float64)
    values = as_non_conformity(scores)
    if p_values is None:
        p_values = conformal_p_values(reference, values)
    with np.errstate(invalid="ignore"):
        beyond = np.maximum(values - reference[-1], 0.0)
    return np.maximum(p_values * np.exp(-beyond / tail_scale(reference)), SMALLEST_P_VALUE)
