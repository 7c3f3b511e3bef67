"""Batch typicality test (Nalisnick et al. 2019b): statistic, bootstrap threshold, calibration."""

import numpy as np
import pytest

from service.scoring.batch_typicality import (
    BatchTypicalityTest,
    batch_typicality_statistic,
    bootstrap_threshold,
)


def test_statistic_is_distance_of_the_batch_mean_from_the_entropy():
    assert batch_typicality_statistic(np.array([2.0, 4.0]), 2.5) == pytest.approx(0.5)


def test_threshold_is_the_conformal_order_statistic():
    bootstrap = np.arange(1.0, 100.0)  # K = 99
    # ceil(0.9 * 100) = 90th smallest
    assert bootstrap_threshold(bootstrap, 0.10) == 90.0
    assert bootstrap_threshold(bootstrap, 0.001) == 99.0


def test_false_positive_rate_on_in_distribution_batches_is_near_alpha():
    rng = np.random.default_rng(0)
    reference = rng.normal(3.0, 0.3, 5000)
    test = BatchTypicalityTest(reference, entropy_bpd=float(reference.mean()), n_bootstrap=2000, seed=1)
    flagged = [test.test(rng.normal(3.0, 0.3, 8), alpha=0.1).is_ood for _ in range(600)]
    assert 0.06 <= np.mean(flagged) <= 0.14


def test_shifted_batches_are_flagged_and_thresholds_shrink_with_size():
    rng = np.random.default_rng(0)
    reference = rng.normal(3.0, 0.3, 5000)
    test = BatchTypicalityTest(reference, entropy_bpd=3.0)
    assert test.test(np.full(16, 2.6), alpha=0.05).is_ood
    assert test.test(np.full(4, 3.0), alpha=0.05).threshold > test.test(np.full(64, 3.0), alpha=0.05).threshold
    with pytest.raises(ValueError, match="at least 2"):
        test.test(np.array([3.0]), alpha=0.05)
