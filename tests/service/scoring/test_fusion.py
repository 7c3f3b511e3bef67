"""Fusion statistics: Fisher and minimum-p, and the fused calibration of a second split."""

from __future__ import annotations

import math

import numpy as np
import pytest

from oodserve.scoring.conformal import conformal_p_values, sort_calibration_scores
from oodserve.scoring.fusion import fisher_statistic, fused_statistic, min_p_statistic
from oodserve.scoring.pipeline import FusionRule, fused_calibration_scores


def test_fisher_is_minus_two_sum_of_log_p() -> None:
    p = np.array([[0.5, 0.25], [1.0, 1.0]])
    np.testing.assert_allclose(fisher_statistic(p), [-2 * (math.log(0.5) + math.log(0.25)), 0.0])


def test_min_p_is_minus_log_of_smallest_p() -> None:
    p = np.array([[0.5, 0.25, 0.9]])
    np.testing.assert_allclose(min_p_statistic(p), [-math.log(0.25)])


def test_fused_statistic_uses_only_the_named_signals_in_order() -> None:
    p_values = {"a": np.array([0.5]), "b": np.array([0.1]), "ignored": np.array([0.001])}
    assert fused_statistic("fisher", p_values, ["a", "b"])[0] == pytest.approx(-2 * math.log(0.05))
    assert fused_statistic("min_p", p_values, ["a", "b"])[0] == pytest.approx(-math.log(0.1))
    with pytest.raises(ValueError, match="unknown fusion method"):
        fused_statistic("mean", p_values, ["a"])


def test_fused_calibration_uses_first_split_p_values_of_second_split_scores() -> None:
    first = {"a": sort_calibration_scores(np.array([1.0, 2.0, 3.0])), "b": sort_calibration_scores(np.array([0.0, 10.0]))}
    second = {"a": np.array([2.0, 4.0]), "b": np.array([5.0, -1.0])}
    got = fused_calibration_scores(first, second, FusionRule("fisher", ("a", "b")))
    p_a = conformal_p_values(first["a"], second["a"])
    p_b = conformal_p_values(first["b"], second["b"])
    np.testing.assert_allclose(got, -2 * (np.log(p_a) + np.log(p_b)))
    np.testing.assert_allclose(p_a, [3 / 4, 1 / 4])
    np.testing.assert_allclose(p_b, [2 / 3, 1.0])
