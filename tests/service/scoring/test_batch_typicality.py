"""Batch typicality test (Nalisnick et al. 2019b) with a conformal p-value over disjoint reference batches."""

import numpy as np
import pytest

from oodserve.models.evaluation.metrics import clopper_pearson
from oodserve.scoring.batch_typicality import (
    BatchTypicalityTest,
    batch_typicality_statistic,
    conformal_threshold,
    disjoint_batch_statistics,
)


def test_statistic_is_distance_of_the_batch_mean_from_the_entropy():
    assert batch_typicality_statistic(np.array([2.0, 4.0]), 2.5) == pytest.approx(0.5)


def test_reference_batches_are_disjoint_and_the_threshold_is_the_conformal_order_statistic():
    reference = np.arange(100.0)
    statistics = disjoint_batch_statistics(reference, entropy_bpd=0.0, batch_size=7, seed=0)
    assert statistics.shape == (14,) and statistics.sum() * 7 == pytest.approx(reference[: 14 * 7].sum() + 0.0, rel=0.2)
    ordered = np.arange(1.0, 100.0)  # K = 99: ceil(0.9 * 100) = 90th smallest
    assert conformal_threshold(ordered, 0.10) == 90.0
    assert conformal_threshold(ordered, 0.001) is None  # beyond K: the resolution 1/100 is coarser than alpha


@pytest.mark.parametrize(("size", "alpha"), [(2, 0.05), (10, 0.05), (10, 0.01), (50, 0.1)])
def test_false_positive_rate_on_exchangeable_batches_is_at_most_alpha(size: int, alpha: float) -> None:
    rng = np.random.default_rng(size)
    trials, flagged = 1500, 0
    for trial in range(trials):
        values = rng.gamma(2.0, 0.3, 3000 + size)  # skewed: the bootstrap's normal-ish assumptions would not hold
        test = BatchTypicalityTest(values[size:], entropy_bpd=0.6, seed=trial)
        flagged += bool(test.test(values[:size], alpha=alpha).is_ood)
    lower = clopper_pearson(flagged, trials, level=0.99)[0]
    assert lower <= alpha, f"{flagged}/{trials} exchangeable batches of {size} flagged at alpha {alpha}"


def test_shifted_batches_are_flagged_and_small_alphas_are_refused_not_clipped():
    rng = np.random.default_rng(0)
    test = BatchTypicalityTest(rng.normal(3.0, 0.3, 5000), entropy_bpd=3.0)
    shifted = test.test(np.full(16, 2.6), alpha=0.05)
    assert shifted.is_ood and shifted.p_value == pytest.approx(1 / (5000 // 16 + 1))
    coarse = test.test(np.full(256, 2.6), alpha=0.01)  # K = 19: resolution 0.05
    assert coarse.is_ood is None and coarse.threshold is None and coarse.minimum_alpha == pytest.approx(0.05)
    assert test.test(np.array([np.nan, 3.0]), alpha=0.05).is_ood  # a statistic that is not a number is OOD
    with pytest.raises(ValueError, match="at least 2"):
        test.test(np.array([3.0]), alpha=0.05)
