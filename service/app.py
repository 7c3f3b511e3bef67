"""The FastAPI application factory: settings, metrics, routers, error handlers, and a lifespan that
loads + verifies bundles and warms them up before readiness."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service import __version__
from service.api import generation, health, metrics, v1
from service.api.errors import install_error_handlers
from service.api.responses import OrjsonResponse
from service.config import Settings
from service.engine import EngineRegistry, load_registry
from service.metrics import RequestMetricsMiddleware, ServiceMetrics
from service.runtime.sessions import RuntimeOptions

logger = logging.getLogger("oodserve.app")


def runtime_options(settings: Settings) -> RuntimeOptions:
    """onnxruntime options from the settings."""
    return RuntimeOptions(
        providers=tuple(settings.providers) if settings.providers else None,
        require_gpu=settings.require_gpu,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
    )


def load_registry_from_settings(settings: Settings) -> EngineRegistry:
    """Verify and load settings.bundle (the default model) and settings.extra_bundles."""
    return load_registry([settings.bundle, *settings.extra_bundles], runtime_options(settings))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load bundles unless given, warm every engine up, then mark the service ready; unready on shutdown."""
    settings: Settings = app.state.settings
    service_metrics: ServiceMetrics = app.state.metrics
    if app.state.registry is None:
        app.state.registry = await run_in_threadpool(load_registry_from_settings, settings)
    registry: EngineRegistry = app.state.registry
    for engine in registry:
        await run_in_threadpool(engine.warm_up, settings.warmup_batch_size)
    service_metrics.track_registry(registry)
    app.state.ready = True
    service_metrics.ready.set(1)
    logger.info("ready: serving %s (default %s)", sorted(registry.engines), registry.default_name)
    try:
        yield
    finally:
        app.state.ready = False
        service_metrics.ready.set(0)


def create_app(settings: Settings | None = None, registry: EngineRegistry | None = None) -> FastAPI:
    """Build the app. With `registry` the given engines are served, else the lifespan loads settings.bundle.

    Usable as `uvicorn --factory service.app:create_app` (settings from OODSERVE_* variables).
    """
    settings = settings or Settings()
    app = FastAPI(
        title="oodserve",
        version=__version__,
        description="Out-of-distribution detection: normalizing flows and SNGP in ONNX, conformal p-values, fused verdicts.",
        default_response_class=OrjsonResponse,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = ServiceMetrics(ood_rate_window=settings.ood_rate_window)
    app.state.registry = registry
    app.state.ready = False
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(v1.router)
    app.include_router(generation.router)
    app.include_router(metrics.router)
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    return app
