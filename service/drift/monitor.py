"""Per-model, per-stream drift state: online conformal p-values of the fused statistic feeding a mixture
power martingale (alarm at 1 / delta, Ville) and a Shiryaev-Roberts change detector (alarm at a mean
time to false alarm of at least `change_threshold` inputs).

A stream is named by the caller (`X-OOD-Stream`); at most `max_streams` live at once, the least recently
used is dropped (and counted) beyond that. A stream restarts (reason `bound`) after `max_stream_inputs`
inputs, which bounds its memory; each segment between restarts keeps its own guarantee. A stream also
restarts (reason `reload`) when its model's calibration changes, since scores of two bundles are not
exchangeable with each other.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from oodserve.config import Settings
from oodserve.drift.conformal_martingale import MixturePowerMartingale, OnlineConformalPValues, ShiryaevRoberts

DEFAULT_STREAM = "default"


@dataclass(frozen=True)
class DriftSettings:
    """delta: the martingale's bound on the probability of any false alarm per segment; change_threshold:
    the Shiryaev-Roberts threshold (a lower bound on the mean inputs to a false alarm)."""

    delta: float = 0.01
    change_threshold: float = 1e8
    max_streams: int = 32
    max_stream_inputs: int = 100_000
    seed: int | None = None

    def describe(self) -> dict[str, Any]:
        """The settings as the drift endpoint reports them, whichever store runs the streams."""
        return {
            "delta": self.delta,
            "martingale_threshold": 1.0 / self.delta,
            "change_threshold": self.change_threshold,
            "max_streams": self.max_streams,
            "max_stream_inputs": self.max_stream_inputs,
        }

    @classmethod
    def from_settings(cls, settings: Settings) -> DriftSettings:
        """Drift monitor options from the settings."""
        return cls(
            delta=settings.drift_delta,
            change_threshold=settings.drift_change_threshold,
            max_streams=settings.drift_max_streams,
            max_stream_inputs=settings.drift_max_stream_inputs,
        )

@dataclass
class StreamState:
    """One stream's tests since its last restart."""

    calibration: np.ndarray
    p_values: OnlineConformalPValues
    martingale: MixturePowerMartingale = field(default_factory=MixturePowerMartingale)
    change: ShiryaevRoberts = field(default_factory=ShiryaevRoberts)
    since: float = field(default_factory=time.time)
    alarm: bool = False
    change_alarm: bool = False
    alarms: dict[str, int] = field(default_factory=lambda: {"martingale": 0, "change": 0})

    @property
    def inputs(self) -> int:
        """Inputs since the restart: the stream scores the online p-values hold."""
        return self.p_values.stream_size


@dataclass(frozen=True)
class StreamReport:
    model: str
    stream: str
    inputs_since_reset: int
    log10_martingale: float
    log10_martingale_max: float
    log10_change_statistic: float
    alarm: bool
    change_alarm: bool
    alarms_total: dict[str, int]
    since: float

    def to_json(self) -> dict[str, Any]:
        def finite(value: float) -> float | None:
            return value if math.isfinite(value) else None

        return {
            "stream": self.stream,
            "inputs_since_reset": self.inputs_since_reset,
            "martingale": 10.0**self.log10_martingale if self.log10_martingale < 300 else None,
            "log10_martingale": self.log10_martingale,
            "log10_martingale_max": self.log10_martingale_max,
            "log10_change_statistic": finite(self.log10_change_statistic),
            "alarm": self.alarm,
            "change_alarm": self.change_alarm,
            "alarms_total": self.alarms_total,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since)),
        }


@dataclass(frozen=True)
class DriftSnapshot:
    """What a store holds at one moment: the streams' reports, streams evicted per model, restarts per (model,
    reason), and the store itself (`kind`: memory or redis; `status`: ok or unavailable, with details)."""

    reports: list[StreamReport]
    evicted: dict[str, int]
    restarts: dict[tuple[str, str], int]
    store: dict[str, Any]

    @property
    def available(self) -> bool:
        return bool(self.store.get("status") == "ok")


LOG10 = math.log(10.0)


class DriftMonitor:
    """All streams of all models. `observe` is called once per scored request with the fused statistics."""

    def __init__(self, settings: DriftSettings) -> None:
        self.settings = settings
        self._streams: OrderedDict[tuple[str, str], StreamState] = OrderedDict()
        self._lock = threading.Lock()
        self._rng = np.random.default_rng(settings.seed)
        self.evicted: dict[str, int] = {}
        self.restarts: dict[tuple[str, str], int] = {}
        self._log_martingale_threshold = -math.log(settings.delta)
        self._log_change_threshold = math.log(settings.change_threshold)

    def _new_state(self, calibration: np.ndarray) -> StreamState:
        child = np.random.default_rng(self._rng.integers(0, 2**63))
        return StreamState(calibration, OnlineConformalPValues(calibration, child))

    def _restart(self, key: tuple[str, str], calibration: np.ndarray, reason: str) -> StreamState:
        state = self._new_state(calibration)
        previous = self._streams.get(key)
        if previous is not None:
            state.alarms = previous.alarms
        self._streams[key] = state
        self.restarts[(key[0], reason)] = self.restarts.get((key[0], reason), 0) + 1
        return state

    def observe(self, model: str, stream: str, calibration: np.ndarray, fused_scores: np.ndarray) -> None:
        """Feed a request's fused statistics (N,) into the stream's tests; `calibration` is the model's fused
        calibration array (the identity of the array tells a reloaded bundle apart)."""
        key = (model, stream)
        with self._lock:
            state = self._streams.get(key)
            if state is None:
                state = self._new_state(calibration)
                self._streams[key] = state
                while len(self._streams) > self.settings.max_streams:
                    (evicted_model, _), _ = self._streams.popitem(last=False)
                    self.evicted[evicted_model] = self.evicted.get(evicted_model, 0) + 1
            elif state.calibration is not calibration:
                state = self._restart(key, calibration, "reload")
            self._streams.move_to_end(key)
            start = 0
            while start < len(fused_scores):
                room = self.settings.max_stream_inputs - state.inputs
                if room <= 0:
                    state = self._restart(key, calibration, "bound")
                    room = self.settings.max_stream_inputs
                chunk = fused_scores[start : start + room]
                self._feed(state, chunk)
                start += len(chunk)

    def _feed(self, state: StreamState, scores: np.ndarray) -> None:
        p_values = state.p_values.p_values(scores)
        log_martingale = state.martingale.update(p_values)
        log_change = state.change.update(p_values)
        if not state.alarm and log_martingale.max() >= self._log_martingale_threshold:
            state.alarm = True
            state.alarms["martingale"] += 1
        if not state.change_alarm and log_change.max() >= self._log_change_threshold:
            state.change_alarm = True
            state.alarms["change"] += 1

    def reset(self, model: str | None = None, stream: str | None = None) -> int:
        """Restart the matching streams (all when both are None); returns how many."""
        with self._lock:
            keys = [key for key in self._streams if (model is None or key[0] == model) and (stream is None or key[1] == stream)]
            for key in keys:
                self._restart(key, self._streams[key].calibration, "admin")
            return len(keys)

    def reports(self, model: str | None = None) -> list[StreamReport]:
        with self._lock:
            return [
                StreamReport(
                    model=key[0],
                    stream=key[1],
                    inputs_since_reset=state.inputs,
                    log10_martingale=state.martingale.log_value / LOG10,
                    log10_martingale_max=state.martingale.log_max / LOG10,
                    log10_change_statistic=state.change.log_value / LOG10,
                    alarm=state.alarm,
                    change_alarm=state.change_alarm,
                    alarms_total=dict(state.alarms),
                    since=state.since,
                )
                for key, state in self._streams.items()
                if model is None or key[0] == model
            ]

    def snapshot(self, model: str | None = None) -> DriftSnapshot:
        """The reports (of `model` when given) and counters; the embedded store is always available."""
        reports = self.reports(model)
        with self._lock:
            evicted, restarts = dict(self.evicted), dict(self.restarts)
        return DriftSnapshot(reports, evicted, restarts, {"kind": "memory", "status": "ok"})

    def close(self) -> None:
        """Nothing to release: the streams live and die with the process."""

    def describe(self) -> dict[str, Any]:
        return self.settings.describe()
