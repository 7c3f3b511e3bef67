"""The drift benchmark's replay of today's OOD-rate rule and its null replays, on synthetic scores."""

from __future__ import annotations

import numpy as np

from oodserve.drift.replay import RATE_HOLD, RATE_WINDOW, null_replays, ood_rate_rule_delay


def test_the_ood_rate_rule_fires_once_the_window_rate_held_long_enough() -> None:
    change = 5000
    flagged = np.zeros(change + 20000, dtype=bool)
    flagged[change:] = True  # every input after the change is flagged
    # the window passes 3 x alpha (15%) after 0.15 * RATE_WINDOW flagged inputs, then must hold RATE_HOLD inputs
    assert ood_rate_rule_delay(flagged, change) == int(0.15 * RATE_WINDOW) + RATE_HOLD - 1  # the 451st flagged input opens the run
    assert ood_rate_rule_delay(np.zeros(30000, dtype=bool), change) is None


def test_null_replays_count_alarms_of_both_variants() -> None:
    pool = np.random.default_rng(0).normal(size=500)
    result = null_replays(pool, replays=20, length=500, calibration_size=200, delta=0.5, seed=0)
    for variant in ("online", "fixed_calibration"):
        entry = result[variant]
        assert isinstance(entry, dict) and 0 <= entry["alarms"] <= 20 and entry["ci95"][0] <= entry["rate"] <= entry["ci95"][1]
