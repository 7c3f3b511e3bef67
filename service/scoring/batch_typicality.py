"""Batch typicality test (Nalisnick et al. 2019b, "Detecting out-of-distribution inputs to deep
generative models using typicality"), numpy only, with a finite-sample guarantee.

For a batch of M inputs the statistic is `|mean(bpd_batch) - H|`, with H the in-distribution
entropy estimate in bits per dimension. Its conformal p-value is computed against the same statistic
on K = floor(n / M) *disjoint* batches of M of the n held-out reference bits/dim values (a seeded
partition): p = (1 + #{T_k >= T}) / (K + 1). When the test batch is exchangeable with the reference
values, the K + 1 batch statistics are exchangeable, so P(p <= alpha) <= alpha for every alpha
(Vovk et al. 2005). Bootstrap batches drawn with replacement (Nalisnick et al.'s construction) share
values and only approximate this. The price of the guarantee is resolution: p >= 1 / (K + 1), so an
alpha below it cannot be tested at that batch size, and the result says so instead of answering.
A NaN statistic (a model that could not score) gets the smallest p-value: maximally OOD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from oodserve.scoring.conformal import conformal_p_values


@dataclass(frozen=True)
class BatchTypicalityResult:
    """Outcome of the test for one batch. `is_ood` and `threshold` are None when alpha <= minimum_alpha."""

    size: int
    statistic: float
    p_value: float
    minimum_alpha: float
    alpha: float
    threshold: float | None
    is_ood: bool | None
    reference_batches: int


def batch_typicality_statistic(batch_bits_per_dim: np.ndarray, entropy_bpd: float) -> float:
    """`|mean(bpd) - H|` for a batch `(M,)` of bits/dim values."""
    return float(abs(np.mean(batch_bits_per_dim) - entropy_bpd))


def disjoint_batch_statistics(reference_bits_per_dim: np.ndarray, entropy_bpd: float, batch_size: int, seed: int) -> np.ndarray:
    """Statistics of the K = floor(n / batch_size) disjoint batches of a seeded permutation of the reference `(n,)`."""
    reference = np.asarray(reference_bits_per_dim, dtype=np.float64)
    count = len(reference) // batch_size
    order = np.random.default_rng([seed, batch_size]).permutation(len(reference))[: count * batch_size]
    return np.abs(reference[order].reshape(count, batch_size).mean(axis=1) - entropy_bpd)


def conformal_threshold(reference_statistics: np.ndarray, alpha: float) -> float | None:
    """The ceil((1 - alpha)(K + 1))-th smallest of K statistics, where the (1 - alpha) conformal quantile lies
    (for plots; the verdict is p < alpha), or None when that rank is beyond K."""
    ordered = np.sort(reference_statistics)
    rank = math.ceil((1.0 - alpha) * (len(ordered) + 1))
    return float(ordered[rank - 1]) if rank <= len(ordered) else None


class BatchTypicalityTest:
    """Caches the reference statistics per batch size; a test is then a sorted-array lookup."""

    def __init__(self, reference_bits_per_dim: np.ndarray, entropy_bpd: float, seed: int = 0) -> None:
        self.reference_bits_per_dim = np.asarray(reference_bits_per_dim, dtype=np.float64)
        self.entropy_bpd = float(entropy_bpd)
        self.seed = seed
        self._statistics_for_size = lru_cache(maxsize=256)(self._sorted_statistics)

    def _sorted_statistics(self, batch_size: int) -> np.ndarray:
        return np.sort(disjoint_batch_statistics(self.reference_bits_per_dim, self.entropy_bpd, batch_size, self.seed))

    def minimum_alpha(self, batch_size: int) -> float:
        """The smallest p-value a batch of this size can get, 1 / (K + 1); 1.0 when K = 0."""
        return 1.0 / (len(self.reference_bits_per_dim) // batch_size + 1)

    def test(self, batch_bits_per_dim: np.ndarray, alpha: float) -> BatchTypicalityResult:
        """Run the test on a batch `(M,)`, 2 <= M."""
        size = len(batch_bits_per_dim)
        if size < 2:
            raise ValueError("the batch typicality test needs at least 2 instances")
        statistic = batch_typicality_statistic(batch_bits_per_dim, self.entropy_bpd)
        reference = self._statistics_for_size(size)
        count = len(reference)
        p_value = float(conformal_p_values(reference, np.array([statistic]))[0])
        minimum = 1.0 / (count + 1.0)
        resolvable = alpha > minimum and count > 0  # p >= minimum always: at or below it nothing could be flagged
        return BatchTypicalityResult(
            size=size,
            statistic=statistic,
            p_value=p_value,
            minimum_alpha=minimum,
            alpha=alpha,
            threshold=conformal_threshold(reference, alpha) if resolvable else None,
            is_ood=bool(p_value < alpha) if resolvable else None,
            reference_batches=count,
        )
