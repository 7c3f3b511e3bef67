"""Offline replays of score streams through the drift tests the server runs: the false-alarm rate of the
conformal test martingale over many exchangeable streams (with its Clopper-Pearson interval), and the delay of
the OOD-rate alert rule it replaces. `benchmarks/drift.py` drives these on the shipped bundle's scores.

Shapes: calibration `(n,)` and stream `(m,)` fused scores (higher = more OOD); flags `(m,)` bool.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from oodserve.drift.conformal_martingale import MixturePowerMartingale, OnlineConformalPValues
from oodserve.stats import clopper_pearson

ALPHA = 0.05
RATE_WINDOW, RATE_HOLD = 3000, 6000
"""The OOD-rate rule in inputs at 10 inputs/s: rate over 5 minutes, held for 10 minutes."""


def stream_alarm(calibration: np.ndarray, stream: np.ndarray, rng: np.random.Generator, grow: bool, delta: float) -> bool:
    martingale = MixturePowerMartingale()
    online = OnlineConformalPValues(calibration, rng, grow=grow)
    for start in range(0, len(stream), 1000):
        martingale.update(online.p_values(stream[start : start + 1000]))
    return martingale.log_max >= -math.log(delta)


def replay_alarms(replays: int, make_streams: Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]], delta: float,
                  seed: int, first_replay: int = 0) -> dict[str, object]:
    """Alarm counts, rates and 95% intervals over `replays` (calibration, stream) pairs from `make_streams`, each
    tested with online p-values and against the calibration alone."""
    counts = {"online": 0, "fixed_calibration": 0}
    for replay in range(replays):
        rng = np.random.default_rng([seed, first_replay + replay])
        calibration, stream = make_streams(rng)
        counts["online"] += stream_alarm(calibration, stream, rng, True, delta)
        counts["fixed_calibration"] += stream_alarm(calibration, stream, rng, False, delta)
    return {
        variant: {"alarms": count, "rate": count / replays, "ci95": clopper_pearson(count, replays)} for variant, count in counts.items()
    }


def null_replays(pool: np.ndarray, replays: int, length: int, calibration_size: int, delta: float, seed: int) -> dict[str, object]:
    """Calibration and stream drawn i.i.d. from `pool`: exchangeable by construction."""
    return replay_alarms(replays, lambda rng: (rng.choice(pool, calibration_size), rng.choice(pool, length)), delta, seed)


def shuffle_replays(calibration: np.ndarray, test: np.ndarray, replays: int, delta: float, seed: int) -> dict[str, object]:
    """Shuffles of the test file against the bundle's calibration."""
    return replay_alarms(replays, lambda rng: (calibration, rng.permutation(test)), delta, seed, first_replay=10_000)


def first_crossing(path: np.ndarray, level: float) -> int | None:
    index = np.flatnonzero(path >= level)
    return int(index[0]) if index.size else None


def ood_rate_rule_delay(flagged: np.ndarray, change: int) -> int | None:
    """Inputs after `change` until the OOD share of the last RATE_WINDOW inputs has stayed above 3 alpha for RATE_HOLD inputs."""
    cumulative = np.concatenate([[0], np.cumsum(flagged)])
    ends = np.arange(RATE_WINDOW, len(flagged) + 1)
    above = (cumulative[ends] - cumulative[ends - RATE_WINDOW]) / RATE_WINDOW > 3 * ALPHA
    run = 0
    for position, is_above in enumerate(above):
        run = run + 1 if is_above else 0
        if run >= RATE_HOLD:
            return int(ends[position] - 1 - change)
    return None
