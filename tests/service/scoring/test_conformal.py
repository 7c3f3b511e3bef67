"""Conformal p-values: edge cases (above, below, equal to every calibration score; ties) and a brute-force check."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oodserve.scoring.conformal import StackedCalibration, conformal_p_values, sort_calibration_scores

CALIBRATION = sort_calibration_scores(np.array([3.0, 1.0, 2.0, 2.0, 5.0]))


def test_score_above_every_calibration_score_gets_the_smallest_p_value() -> None:
    assert conformal_p_values(CALIBRATION, np.array([5.5]))[0] == pytest.approx(1.0 / 6.0)


def test_score_below_every_calibration_score_gets_p_value_one() -> None:
    assert conformal_p_values(CALIBRATION, np.array([-10.0]))[0] == 1.0


def test_score_equal_to_every_calibration_score_gets_p_value_one() -> None:
    constant = sort_calibration_scores(np.full(4, 7.0))
    assert conformal_p_values(constant, np.array([7.0]))[0] == 1.0
    assert conformal_p_values(constant, np.array([np.nextafter(7.0, 8.0)]))[0] == pytest.approx(1.0 / 5.0)


def test_ties_count_as_at_least_the_score() -> None:
    # calibration 1, 2, 2, 3, 5: three scores are >= 2, one is >= 5 (the maximum itself)
    p = conformal_p_values(CALIBRATION, np.array([2.0, 5.0, 1.0, 2.5]))
    np.testing.assert_allclose(p, [(1 + 4) / 6, (1 + 1) / 6, (1 + 5) / 6, (1 + 2) / 6])


def test_nan_score_is_treated_as_most_out_of_distribution() -> None:
    assert conformal_p_values(CALIBRATION, np.array([np.nan]))[0] == pytest.approx(1.0 / 6.0)


def test_sort_calibration_scores_refuses_bad_arrays() -> None:
    with pytest.raises(ValueError, match="empty"):
        sort_calibration_scores(np.array([]))
    with pytest.raises(ValueError, match="1-D"):
        sort_calibration_scores(np.ones((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        sort_calibration_scores(np.array([1.0, np.inf]))


@settings(max_examples=60, deadline=None)
@given(
    calibration=st.lists(st.integers(-5, 5), min_size=1, max_size=30),
    scores=st.lists(st.integers(-6, 6), min_size=1, max_size=10),
)
def test_matches_brute_force_count_with_many_ties(calibration: list[int], scores: list[int]) -> None:
    calibration_array = np.array(calibration, dtype=np.float64)
    expected = [(1 + np.sum(calibration_array >= score)) / (len(calibration) + 1) for score in scores]
    got = conformal_p_values(sort_calibration_scores(calibration_array), np.array(scores, dtype=np.float64))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)
    assert np.all((got > 0) & (got <= 1))


def test_p_values_are_valid_on_exchangeable_data() -> None:
    """P(p <= alpha) <= alpha over draws of calibration set and test point (the marginal conformal guarantee)."""
    rng = np.random.default_rng(0)
    trials, n = 4000, 19
    draws = rng.normal(size=(trials, n + 1))
    p = np.array([conformal_p_values(sort_calibration_scores(row[:n]), row[n:])[0] for row in draws])
    for alpha in (0.05, 0.1, 0.3):
        # with n = 19 the p-value is uniform on {1/20, ..., 1}: P(p <= alpha) = floor(20 alpha) / 20 <= alpha
        assert np.mean(p <= alpha + 1e-12) <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / trials)


def test_every_non_finite_score_counts_as_the_most_ood() -> None:

    calibration = sort_calibration_scores(np.arange(9.0))
    p_values = conformal_p_values(calibration, np.array([np.nan, np.inf, -np.inf, -1e300]))
    np.testing.assert_allclose(p_values, [0.1, 0.1, 0.1, 1.0])  # -inf is not "more typical than anything"


@settings(max_examples=200, deadline=None)
@given(
    calibrations=st.lists(
        st.lists(st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False), min_size=1, max_size=40), min_size=1, max_size=6
    ),
    data=st.data(),
)
def test_stacked_p_values_equal_one_search_per_signal(calibrations: list[list[float]], data: st.DataObject) -> None:
    """One search over every signal's calibration gives each signal's own p-values exactly: scores drawn from the
    calibration values themselves (ties), around them, and non-finite."""
    sorted_calibrations = [sort_calibration_scores(np.array(values)) for values in calibrations]
    stacked = StackedCalibration(sorted_calibrations)
    pool = [value for values in calibrations for value in values] + [np.nan, np.inf, -np.inf, 0.0, -1e300, 1e300]
    count = data.draw(st.integers(0, 12))
    value = st.one_of(st.sampled_from(pool), st.floats(allow_nan=True))
    rows = [data.draw(st.lists(value, min_size=count, max_size=count)) for _ in calibrations]
    scores = np.array(rows, dtype=np.float64).reshape(len(calibrations), count)
    expected = np.stack([conformal_p_values(calibration, scores[index]) for index, calibration in enumerate(sorted_calibrations)])
    np.testing.assert_array_equal(stacked.p_values(scores), expected)


def test_stacked_p_values_refuse_a_wrong_number_of_rows() -> None:
    stacked = StackedCalibration([CALIBRATION, CALIBRATION])
    with pytest.raises(ValueError, match=r"\(2, N\)"):
        stacked.p_values(np.zeros((3, 4)))
