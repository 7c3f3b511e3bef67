"""The online tests' guarantees, measured over many replays (each claim could fail)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import kstest

from oodserve.drift.conformal_martingale import (
    DEFAULT_EPSILONS,
    MixturePowerMartingale,
    OnlineConformalPValues,
    ShiryaevRoberts,
    log_betting_components,
)
from oodserve.models.evaluation.metrics import clopper_pearson


def upper_bound(failures: int, trials: int) -> float:
    """One-sided 99% upper bound of a rate (the upper end of the two-sided 98% interval)."""
    return clopper_pearson(failures, trials, level=0.98)[1]


def lower_bound(failures: int, trials: int) -> float:
    return clopper_pearson(failures, trials, level=0.98)[0]


def test_online_p_values_are_uniform_even_with_ties() -> None:
    rng = np.random.default_rng(0)
    calibration = rng.integers(0, 5, 100).astype(float)  # heavy ties: the smoothing must still give U(0, 1)
    online = OnlineConformalPValues(calibration, np.random.default_rng(1))
    p_values = online.p_values(rng.integers(0, 5, 5000).astype(float))
    assert kstest(p_values, "uniform").pvalue > 0.01
    assert online.stream_size == 5000


def test_p_value_counts_greater_and_ties_with_the_new_score() -> None:
    online = OnlineConformalPValues(np.array([1.0, 2.0, 3.0]), np.random.default_rng(0))
    tau = np.random.default_rng(0).random(1)[0]
    # score 2: one reference score greater, one equal plus itself, over 3 + 1
    assert online.p_values(np.array([2.0]))[0] == pytest.approx((1 + tau * 2) / 4)
    assert online.stream_size == 1
    assert online.p_values(np.array([np.nan]))[0] <= 1.0 / 5  # NaN is the most OOD score there is


@given(st.lists(st.floats(1e-12, 1.0), min_size=1, max_size=40))
@settings(max_examples=50, deadline=None)
def test_martingale_and_shiryaev_roberts_follow_their_recursions(p_values: list[float]) -> None:
    values = np.array(p_values)
    martingale, change = MixturePowerMartingale(), ShiryaevRoberts()
    path = np.concatenate([martingale.update(values[:3]), martingale.update(values[3:])])
    expected = [np.log(np.mean([np.prod(e * values[: i + 1] ** (e - 1)) for e in DEFAULT_EPSILONS])) for i in range(len(values))]
    np.testing.assert_allclose(path, expected, rtol=1e-9, atol=1e-9)
    statistic, direct = np.concatenate([change.update(values[:2]), change.update(values[2:])]), []
    components = np.zeros(len(DEFAULT_EPSILONS))
    for p in values:
        components = (components + 1.0) * np.array([e * p ** (e - 1) for e in DEFAULT_EPSILONS])
        direct.append(math.log(components.mean()))
    np.testing.assert_allclose(statistic, direct, rtol=1e-9)


def test_every_betting_function_is_a_density() -> None:
    u = (np.arange(200_000) + 0.5) / 200_000  # p = u^20 takes the singularity at p = 0 out of the integrand
    integrals = np.mean(np.exp(log_betting_components(u**20)) * (20 * u**19)[:, None], axis=0)
    np.testing.assert_allclose(integrals, 1.0, atol=1e-3)


def replay_alarms(streams: int, length: int, calibration_size: int, grow: bool, delta: float, seed: int) -> int:
    """How many clean streams (calibration and stream i.i.d.) ever reach 1/delta."""
    alarms = 0
    for index in range(streams):
        rng = np.random.default_rng([seed, index])
        online = OnlineConformalPValues(rng.normal(size=calibration_size), rng, grow=grow)
        martingale = MixturePowerMartingale()
        martingale.update(online.p_values(rng.normal(size=length)))
        alarms += martingale.log_max >= -math.log(delta)
    return alarms


def test_ville_bounds_the_false_alarm_rate_of_the_online_martingale() -> None:
    streams, delta = 300, 0.05
    alarms = replay_alarms(streams, 2000, 200, grow=True, delta=delta, seed=0)
    assert lower_bound(alarms, streams) <= delta, f"{alarms}/{streams} clean streams alarmed at delta {delta}"


def test_a_fixed_calibration_set_makes_the_martingale_drift_on_long_clean_streams() -> None:
    # the same streams against the 50 calibration scores alone: i.i.d. given them, not uniform
    streams, delta = 60, 0.05
    fixed = replay_alarms(streams, 5000, 50, grow=False, delta=delta, seed=1)
    online = replay_alarms(streams, 5000, 50, grow=True, delta=delta, seed=1)
    assert lower_bound(fixed, streams) > delta, f"fixed calibration: {fixed}/{streams}"
    assert upper_bound(online, streams) > 0 and fixed > online


def test_shiryaev_roberts_mean_time_to_false_alarm_is_at_least_the_threshold() -> None:
    threshold, cap, runs = 100.0, 5000, 200
    rng = np.random.default_rng(2)
    times = []
    for _ in range(runs):
        change = ShiryaevRoberts()
        path = change.update(rng.random(cap))
        crossed = np.flatnonzero(path >= math.log(threshold))
        times.append(crossed[0] + 1 if crossed.size else cap)  # censored at the cap: an underestimate
    mean, error = float(np.mean(times)), float(np.std(times) / np.sqrt(runs))
    assert mean + 3 * error >= threshold, f"mean run length {mean:.0f} +- {error:.0f} below {threshold}"


def test_both_tests_alarm_soon_after_a_switch_to_ood() -> None:
    rng = np.random.default_rng(3)
    online = OnlineConformalPValues(rng.normal(size=1000), rng)
    martingale, change = MixturePowerMartingale(), ShiryaevRoberts()
    clean = online.p_values(rng.normal(size=3000))
    assert martingale.update(clean).max() < math.log(100) and change.update(clean).max() < math.log(1e8)
    shifted = online.p_values(rng.normal(loc=3.0, size=200))  # 3 standard deviations away
    martingale_path, change_path = martingale.update(shifted), change.update(shifted)
    assert martingale_path.max() >= math.log(100) and np.argmax(martingale_path >= math.log(100)) < 100
    assert change_path.max() >= math.log(1e8) and np.argmax(change_path >= math.log(1e8)) < 100
