"""The drift store a process runs with, chosen by OODSERVE_DRIFT_STORE: the embedded in-memory monitor (`memory`, one
process) or the shared Redis/Valkey store (`redis://...`, every replica). A module of its own so the store interface
(`oodserve.drift.store`) and its implementations import each other in one direction only."""

from __future__ import annotations

from oodserve.config import MEMORY_STORE
from oodserve.drift.monitor import DriftMonitor, DriftSettings
from oodserve.drift.redis_store import RedisDriftStore
from oodserve.drift.store import DriftStore, StoreOptions


def create_drift_store(settings: DriftSettings, options: StoreOptions) -> DriftStore:
    """The in-memory monitor for `memory`, else a shared Redis/Valkey store at `options.url`."""
    if options.url == MEMORY_STORE:
        return DriftMonitor(settings)
    return RedisDriftStore(settings, options)
