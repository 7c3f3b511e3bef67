"""Batch typicality test (Nalisnick et al. 2019b, "Detecting out-of-distribution inputs to deep
generative models using typicality"), numpy only.

For a batch of M inputs the statistic is `|mean(bpd_batch) - H|`, with H the in-distribution
entropy estimate in bits per dimension. The threshold for size M at level alpha is the
(1 - alpha) quantile of the same statistic over bootstrap batches of M drawn from held-out
in-distribution bits/dim; the batch is OOD when its statistic exceeds the threshold.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np


@dataclass(frozen=True)
class BatchTypicalityResult:
    """Outcome of the test for one batch."""

    size: int
    statistic: float
    threshold: float
    alpha: float
    is_ood: bool


def batch_typicality_statistic(batch_bits_per_dim: np.ndarray, entropy_bpd: float) -> float:
    """`|mean(bpd) - H|` for a batch `(M,)` of bits/dim values."""
    return float(abs(np.mean(batch_bits_per_dim) - entropy_bpd))


def bootstrap_statistics(
    reference_bits_per_dim: np.ndarray, entropy_bpd: float, batch_size: int, n_bootstrap: int, seed: int
) -> np.ndarray:
    """Statistics of `n_bootstrap` batches of `batch_size` drawn with replacement from the reference `(n,)`."""
    rng = np.random.default_rng([seed, batch_size])
    reference = np.asarray(reference_bits_per_dim, dtype=np.float64)
    means = np.empty(n_bootstrap, dtype=np.float64)
    chunk = max(1, 2_000_000 // max(batch_size, 1))
    for start in range(0, n_bootstrap, chunk):
        stop = min(n_bootstrap, start + chunk)
        draws = rng.integers(0, len(reference), size=(stop - start, batch_size))
        means[start:stop] = reference[draws].mean(axis=1)
    return np.abs(means - entropy_bpd)


def bootstrap_threshold(bootstrap: np.ndarray, alpha: float) -> float:
    """Conformal-style threshold: the ceil((1 - alpha)(K + 1))-th smallest of K bootstrap statistics."""
    ordered = np.sort(bootstrap)
    rank = int(np.ceil((1.0 - alpha) * (len(ordered) + 1)))
    return float(ordered[min(rank, len(ordered)) - 1])


class BatchTypicalityTest:
    """Caches the bootstrap statistics per batch size; thresholds per alpha are then a sort lookup."""

    def __init__(
        self, reference_bits_per_dim: np.ndarray, entropy_bpd: float, n_bootstrap: int = 2000, seed: int = 0
    ) -> None:
        self.reference_bits_per_dim = np.asarray(reference_bits_per_dim, dtype=np.float64)
        self.entropy_bpd = float(entropy_bpd)
        self.n_bootstrap = n_bootstrap
        self.seed = seed
        self._bootstrap_for_size = lru_cache(maxsize=256)(self._bootstrap)

    def _bootstrap(self, batch_size: int) -> np.ndarray:
        return bootstrap_statistics(
            self.reference_bits_per_dim, self.entropy_bpd, batch_size, self.n_bootstrap, self.seed
        )

    def test(self, batch_bits_per_dim: np.ndarray, alpha: float) -> BatchTypicalityResult:
        """Run the test on a batch `(M,)`, M >= 2."""
        size = len(batch_bits_per_dim)
        if size < 2:
            raise ValueError("the batch typicality test needs at least 2 instances")
        statistic = batch_typicality_statistic(batch_bits_per_dim, self.entropy_bpd)
        threshold = bootstrap_threshold(self._bootstrap_for_size(size), alpha)
        return BatchTypicalityResult(size, statistic, threshold, alpha, statistic > threshold)
