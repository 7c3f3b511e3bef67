"""Where the drift streams live: the embedded in-memory store of one process (`DriftMonitor`, the default) or a
shared Valkey/Redis store that every replica of a deployment reads and updates (`RedisDriftStore`,
`OODSERVE_DRIFT_STORE=redis://...`). Both answer the same calls: `observe` on the request path (never blocking on
a network), `reset`, `snapshot` for the drift endpoint and the metrics, `describe` and `close`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from oodserve.config import MEMORY_STORE, Settings
from oodserve.drift.monitor import DriftSettings, DriftSnapshot


class DriftStore(Protocol):
    """The drift tests of every (model, stream), wherever their state is kept."""

    settings: DriftSettings

    def observe(self, model: str, stream: str, calibration: np.ndarray, fused_scores: np.ndarray) -> None:
        """Feed a request's fused statistics (N,); `calibration` is the model's fused calibration array (M,)."""
        ...

    def reset(self, model: str | None = None, stream: str | None = None) -> int:
        """Restart the matching streams; returns how many."""
        ...

    def snapshot(self, model: str | None = None) -> DriftSnapshot:
        """Every stream's report (of one model when given), the eviction and restart counters and the store's status."""
        ...

    def describe(self) -> dict[str, Any]:
        """The tests' settings, for the drift endpoint."""
        ...

    def close(self) -> None:
        """Flush what is pending (briefly) and release connections."""
        ...


@dataclass(frozen=True)
class StoreOptions:
    """url: `memory` or a redis://, rediss:// or unix:// URL; password: overrides the URL's (from a Secret);
    timeout_ms: the longest one store call may take; buffer_inputs: inputs held per replica while the store is
    slow or down before the oldest are dropped (and their streams restarted); prefix: of every key."""

    url: str = MEMORY_STORE
    password: str | None = None
    timeout_ms: float = 50.0
    buffer_inputs: int = 50_000
    prefix: str = "oodserve:drift"

    @classmethod
    def from_settings(cls, settings: Settings) -> StoreOptions:
        """Where the drift streams live (OODSERVE_DRIFT_STORE and its options)."""
        password = settings.drift_store_password.get_secret_value() if settings.drift_store_password is not None else None
        return cls(
            url=settings.drift_store,
            password=password,
            timeout_ms=settings.drift_store_timeout_ms,
            buffer_inputs=settings.drift_store_buffer_inputs,
            prefix=settings.drift_store_prefix,
        )
