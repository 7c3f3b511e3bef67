"""Cross-conformal and calibration-conditional p-values: the pure functions against brute force, and their guarantees
measured over many simulated calibration draws (tests that could fail)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oodserve.models.build.conditional import conditional_band
from oodserve.scoring.conformal import conditional_p_values, conformal_p_values, count_at_least
from oodserve.scoring.cross_conformal import (
    cross_conformal_counts,
    cross_conformal_p_values,
    tail_extended_p_values,
    worst_case_rate,
)
from oodserve.stats import clopper_pearson

scores = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=30)


@settings(max_examples=200, deadline=None)
@given(st.lists(scores, min_size=1, max_size=5), st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=8), st.data())
def test_cross_conformal_counts_equal_the_brute_force_sum_over_folds(folds: list[list[float]], _: list[float], data: st.DataObject) -> None:
    count = data.draw(st.integers(1, 6))
    statistics = [np.array(data.draw(st.lists(st.floats(allow_nan=True), min_size=count, max_size=count))) for _ in folds]
    calibration = [np.sort(np.array(fold)) for fold in folds]
    expected = [sum(int(np.sum(c >= (s if np.isfinite(s) else np.inf))) for c, s in zip(calibration, column))
                for column in zip(*statistics)]
    assert cross_conformal_counts(calibration, statistics).tolist() == expected
    total = sum(len(fold) for fold in folds)
    np.testing.assert_allclose(cross_conformal_p_values(calibration, statistics), (1.0 + np.array(expected)) / (total + 1.0))


def test_one_fold_is_split_conformal() -> None:
    rng = np.random.default_rng(0)
    calibration, values = np.sort(rng.normal(size=50)), rng.normal(size=20)
    np.testing.assert_array_equal(cross_conformal_p_values([calibration], [values]), conformal_p_values(calibration, values))


@settings(max_examples=100, deadline=None)
@given(scores, st.lists(st.floats(-1e7, 1e7, allow_nan=False), min_size=2, max_size=20))
def test_the_tail_extension_is_the_conformal_p_value_inside_the_reference_and_keeps_falling_beyond(reference: list[float],
                                                                                                 values: list[float]) -> None:
    ordered = np.sort(np.array(reference))
    points = np.sort(np.array(values))
    extended = tail_extended_p_values(ordered, points)
    inside = points <= ordered[-1]
    np.testing.assert_array_equal(extended[inside], conformal_p_values(ordered, points[inside]))
    assert np.all(np.diff(extended) <= 0) and np.all(extended > 0)
    beyond = points[points > ordered[-1]]
    if beyond.size >= 2 and beyond[-1] - beyond[0] > 1e-3 * (abs(ordered[-1]) + 1) and extended[-1] > 1e-290:
        assert extended[-1] < extended[inside.sum()]


def test_a_non_finite_signal_is_the_most_outlying() -> None:
    reference = np.sort(np.random.default_rng(1).normal(size=20))
    assert tail_extended_p_values(reference, np.array([np.nan, np.inf, -np.inf])).max() <= 1e-299
    assert cross_conformal_counts([reference], [np.array([np.nan])]).tolist() == [0]


def test_the_cross_conformal_false_positive_rate_stays_at_alpha_for_exchangeable_fold_scores() -> None:
    """K folds whose score functions differ (each fold rescales its scores): the fold statistics of an in-distribution
    input are exchangeable with each fold's held-out scores, so P(p < alpha) stays at or below alpha."""
    rng = np.random.default_rng(2)
    folds, per_fold, draws, alpha = 5, 12, 4000, 0.1
    flagged = 0
    for _ in range(draws):
        scales = rng.uniform(0.5, 2.0, folds)
        calibration = [np.sort(scale * rng.standard_normal(per_fold)) for scale in scales]
        point = rng.standard_normal()
        p = cross_conformal_p_values(calibration, [np.array([scale * point]) for scale in scales])
        flagged += int(p[0] < alpha)
    low, _ = clopper_pearson(flagged, draws)
    assert low <= alpha, f"{flagged} of {draws} flagged at alpha {alpha}"
    assert worst_case_rate(alpha, folds * per_fold, folds) == pytest.approx(2 * alpha + min(2 * 0.8 / 13, (1 - 5 / 60) / 6))


def test_calibration_conditional_p_values_keep_the_rate_below_alpha_on_most_draws() -> None:
    """Bates et al. 2023: with probability >= 1 - delta over the calibration draw, the conditional FPR at alpha (which is
    U_(k) for the k flagged counts) is at most alpha; over 3,000 draws the share of bad draws must not exceed delta."""
    count, delta, draws = 200, 0.1, 3000
    band = conditional_band(count, delta, simulations=2000, seed=3)
    assert np.all(np.diff(band) >= 0) and band[-1] == 1.0 and band[0] > 1.0 / (count + 1)
    rng = np.random.default_rng(4)
    for alpha in (0.05, 0.1, 0.2):
        flagged = int(np.sum(band < alpha))  # counts c with band[c] < alpha are flagged: c = 0..flagged-1
        order_statistics = np.sort(rng.random((draws, count)), axis=1)[:, flagged - 1]
        bad = int(np.sum(order_statistics > alpha))
        low, _ = clopper_pearson(bad, draws)
        assert low <= delta, f"alpha {alpha}: {bad} of {draws} draws exceed it"
    # and the lookup is what the engine serves
    calibration = np.sort(rng.normal(size=count))
    values = rng.normal(size=50)
    np.testing.assert_array_equal(conditional_p_values(band, calibration, values), band[count_at_least(calibration, values)])
