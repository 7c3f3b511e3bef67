"""The replay behind benchmarks/batch_test_replay.py on synthetic bits/dim (no bundle): batches cut disjointly from a pool
exchangeable with the reference are flagged by the conformal batch typicality test at a rate of at most alpha, and a
shifted pool is flagged."""

import numpy as np

from oodserve.scoring.batch_typicality import BatchTypicalityTest
from oodserve.stats import clopper_pearson

SIZE, ALPHA, REFERENCE, POOL, REPLAYS = 10, 0.1, 500, 200, 400


def replay_rate(shift: float) -> float:
    """Flag rate over REPLAYS independent (reference, pool) draws, each pool cut into POOL // SIZE disjoint batches."""
    rng = np.random.default_rng(7)
    flagged = batches = 0
    for replay in range(REPLAYS):
        values = rng.gamma(2.0, 0.3, REFERENCE + POOL)  # skewed, like bits/dim; H below the mean, as the shipped bundle's is
        test = BatchTypicalityTest(values[:REFERENCE], entropy_bpd=0.55, seed=replay)
        pool = values[REFERENCE:] + shift
        for batch in rng.permutation(POOL).reshape(-1, SIZE):
            result = test.test(pool[batch], ALPHA)
            assert result.is_ood is not None and result.reference_batches == REFERENCE // SIZE
            flagged += result.is_ood
            batches += 1
    return flagged / batches


def test_disjoint_batches_of_an_exchangeable_pool_are_flagged_at_most_alpha_and_a_shifted_pool_is_flagged() -> None:
    rate = replay_rate(0.0)
    # batches of one replay share its reference, so they are not independent: the interval counts one batch per replay
    # at the averaged rate (the average of identically distributed flags varies no more than one of them)
    low, high = clopper_pearson(round(rate * REPLAYS), REPLAYS, level=0.99)
    assert low <= ALPHA, f"exchangeable batches flagged at {rate:.4f}, 99% interval [{low:.4f}, {high:.4f}] above alpha {ALPHA}"
    assert rate > 0.5 * ALPHA, f"exchangeable batches flagged at {rate:.4f}: far below alpha {ALPHA}, the test has no size left"
    assert replay_rate(0.4) > 0.9  # three standard deviations of a batch mean of 10
