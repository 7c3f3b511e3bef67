"""FastAPI dependencies as Annotated aliases: settings, metrics, the ready engine registry, one engine by name."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.api.errors import ApiError
from service.config import Settings
from service.engine import Engine, EngineRegistry
from service.metrics import ServiceMetrics


# Dependencies are `async def` although they never await: FastAPI runs plain `def` dependencies in its
# thread pool, a thread hop (and GIL hand-over) per dependency per request that costs more than scoring.


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


async def get_ready_registry(request: Request) -> EngineRegistry:
    """The engines, or 503 until bundles are loaded and warmed up."""
    registry = request.app.state.registry
    if not request.app.state.ready or registry is None:
        raise ApiError(503, "not_ready", "the service is starting: bundles are not loaded and warmed up yet")
    return registry


SettingsDep = Annotated[Settings, Depends(get_settings)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
RegistryDep = Annotated[EngineRegistry, Depends(get_ready_registry)]


async def get_named_engine(name: str, registry: RegistryDep) -> Engine:
    """The engine serving bundle `name`, or 404 listing the served names."""
    engine = registry.get(name)
    if engine is None:
        raise ApiError(404, "model_not_found", f"no model named {name!r}; served models: {sorted(registry.engines)}")
    return engine


NamedEngineDep = Annotated[Engine, Depends(get_named_engine)]
