"""`oodserve score --drift`: the server's anytime-valid stream tests over a scored table in stored order.

The rows' fused statistics, in the order they are stored, feed the same tests as one stream of the server
(`oodserve.drift.monitor`): online smoothed conformal p-values against the bundle's fused calibration, a mixture
power martingale (alarm when it reaches 1 / delta: under exchangeability the probability of any false alarm
is at most delta, by Ville's inequality; Vovk et al. 2003) and a Shiryaev-Roberts change detector, restarted
every `max_stream_inputs` rows exactly as a server stream is. The report says whether each test fired and at
which scored row (its position in the stream, and its `source` and `row`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oodserve.drift.conformal_martingale import MixturePowerMartingale, OnlineConformalPValues, ShiryaevRoberts
from oodserve.drift.monitor import DriftSettings

LOG10 = math.log(10.0)


@dataclass
class Alarm:
    """The first time one test crossed its threshold: the stream position (0-based, scored rows only) and the row."""

    position: int
    source: str
    row: int
    segment: int


@dataclass
class StoredOrderDrift:
    """Feed `observe(fused_scores, sources, rows)` in stored order; `report()` at the end."""

    calibration: np.ndarray
    settings: DriftSettings = field(default_factory=DriftSettings)
    seed: int = 0
    martingale_alarm: Alarm | None = None
    change_alarm: Alarm | None = None
    inputs: int = 0
    segments: int = 0
    log_martingale_max: float = 0.0

    def __post_init__(self) -> None:
        self._rng = np.random.default_rng(self.seed if self.settings.seed is None else self.settings.seed)
        self._restart()

    def _restart(self) -> None:
        self._p_values = OnlineConformalPValues(self.calibration, np.random.default_rng(self._rng.integers(0, 2**63)))
        self._martingale = MixturePowerMartingale()
        self._change = ShiryaevRoberts()
        self._segment_inputs = 0
        self.segments += 1

    def observe(self, scores: np.ndarray, sources: np.ndarray, rows: np.ndarray) -> None:
        """Scores (n,) of scored rows in stored order, with their sources (n,) and row indices (n,)."""
        start = 0
        while start < len(scores):
            room = self.settings.max_stream_inputs - self._segment_inputs
            if room <= 0:
                self._restart()
                room = self.settings.max_stream_inputs
            stop = min(len(scores), start + room)
            p_values = self._p_values.p_values(scores[start:stop])
            log_martingale = self._martingale.update(p_values)
            log_change = self._change.update(p_values)
            self.log_martingale_max = max(self.log_martingale_max, float(log_martingale.max()))
            if self.martingale_alarm is None:
                self.martingale_alarm = self._first(log_martingale, -math.log(self.settings.delta), start, sources, rows)
            if self.change_alarm is None:
                self.change_alarm = self._first(log_change, math.log(self.settings.change_threshold), start, sources, rows)
            self._segment_inputs += stop - start
            self.inputs += stop - start
            start = stop

    def _first(self, path: np.ndarray, level: float, start: int, sources: np.ndarray, rows: np.ndarray) -> Alarm | None:
        crossed = np.flatnonzero(path >= level)
        if not crossed.size:
            return None
        offset = int(crossed[0])
        return Alarm(self.inputs + offset, str(sources[start + offset]), int(rows[start + offset]), self.segments)

    def report(self) -> dict[str, Any]:
        def alarm(found: Alarm | None) -> dict[str, Any]:
            if found is None:
                return {"alarm": False}
            return {"alarm": True, "position": found.position, "source": found.source, "row": found.row, "segment": found.segment}

        return {
            "inputs": self.inputs,
            "segments": self.segments,
            "delta": self.settings.delta,
            "martingale": {**alarm(self.martingale_alarm), "threshold": 1.0 / self.settings.delta,
                           "log10_max": self.log_martingale_max / LOG10},
            "change": {**alarm(self.change_alarm), "threshold": self.settings.change_threshold},
        }
