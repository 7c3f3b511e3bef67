"""FastAPI dependencies as Annotated aliases: the app state, settings, metrics, the ready engine registry,
one engine by name (and version)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from oodserve.config import Settings
from oodserve.engine import Engine, EngineRegistry
from oodserve.observability.metrics import ServiceMetrics
from oodserve.server.state import AppState, app_state

# Dependencies are `async def` although they never await: FastAPI runs plain `def` dependencies in its
# thread pool, a thread hop (and GIL hand-over) per dependency per request that costs more than scoring.


async def get_state(request: Request) -> AppState:
    return app_state(request)


StateDep = Annotated[AppState, Depends(get_state)]


async def get_settings(state: StateDep) -> Settings:
    return state.settings


async def get_metrics(state: StateDep) -> ServiceMetrics:
    return state.metrics


async def get_ready_registry(state: StateDep) -> EngineRegistry:
    """The engines, or NotReadyError (503) until bundles are loaded and warmed up."""
    return state.plane.registry()


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
RegistryDep = Annotated[EngineRegistry, Depends(get_ready_registry)]


async def get_named_engine(name: str, state: StateDep) -> Engine:
    """The engine serving bundle `name` (a path parameter), else UnknownModelError (404) listing the served names."""
    return state.plane.model(name)


async def get_versioned_engine(name: str, state: StateDep, version: str | None = None) -> Engine:
    """As get_named_engine, and the model's version must equal `version` when the path names one (v2)."""
    return state.plane.model(name, version)


NamedEngineDep = Annotated[Engine, Depends(get_named_engine)]
VersionedEngineDep = Annotated[Engine, Depends(get_versioned_engine)]
