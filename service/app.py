"""The FastAPI application factory: settings, metrics, routers, error handlers, and a lifespan that
loads + verifies bundles and warms them up before readiness."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from service import __version__
from service.api import admin, generation, health, metrics, v1, v2
from service.api.errors import install_error_handlers
from service.api.responses import OrjsonResponse
from service.api.schemas import ERROR_RESPONSES, v2_error_responses
from service.config import Settings
from service.engine import EngineRegistry, load_registry
from service.limits import LIMIT_ERROR_RESPONSES, RequestLimitsMiddleware
from service.metrics import RequestMetricsMiddleware, ServiceMetrics
from service.reload import BundleReloader, install_sighup_reload
from service.runtime.batching import BatchingOptions, BatchScheduler
from service.runtime.sessions import RuntimeOptions
from service.security import AUTH_ERROR_RESPONSES, METRICS_KEY_DEPENDENCIES, SCORING_KEY_DEPENDENCIES

logger = logging.getLogger("oodserve.app")


def runtime_options(settings: Settings) -> RuntimeOptions:
    """onnxruntime options from the settings."""
    return RuntimeOptions(
        providers=tuple(settings.providers) if settings.providers else None,
        require_gpu=settings.require_gpu,
        intra_op_threads=settings.intra_op_threads,
        inter_op_threads=settings.inter_op_threads,
        allow_spinning=settings.onnxruntime_spinning,
    )


def batching_options(settings: Settings) -> BatchingOptions:
    """Dynamic batching options from the settings."""
    return BatchingOptions(
        enabled=settings.batching,
        max_batch_size=settings.batch_max_size,
        max_queue_delay_ms=settings.batch_max_delay_ms,
        queue_capacity=settings.batch_queue_capacity,
        deadline_ms=settings.batch_deadline_seconds * 1000.0,
        inference_threads=settings.inference_threads or os.cpu_count() or 1,
        side_by_side_max_batch=settings.batch_side_by_side_max,
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
    uninstall_sighup = install_sighup_reload(app.state.reloader) if settings.reload_on_sighup else None
    try:
        yield
    finally:
        if uninstall_sighup is not None:
            uninstall_sighup()
        app.state.ready = False
        service_metrics.ready.set(0)
        await app.state.batching.close()


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
    app.state.batching = BatchScheduler(batching_options(settings), on_queue_wait=app.state.metrics.observe_queue_wait)
    app.state.metrics.track_scheduler(app.state.batching)
    app.state.reloader = BundleReloader(app.state, runtime_options)
    install_error_handlers(app)
    protected = {**AUTH_ERROR_RESPONSES, **LIMIT_ERROR_RESPONSES}  # documented so schema checks hold
    app.include_router(health.router, responses=LIMIT_ERROR_RESPONSES)
    app.include_router(v1.router, dependencies=SCORING_KEY_DEPENDENCIES, responses=protected)
    app.include_router(generation.router, dependencies=SCORING_KEY_DEPENDENCIES, responses=protected)
    v2_errors = v2_error_responses({**ERROR_RESPONSES, **protected})  # v2 answers {"error": "..."}
    app.include_router(v2.health_router, responses=v2_errors)
    app.include_router(v2.router, dependencies=SCORING_KEY_DEPENDENCIES, responses=v2_errors)
    app.include_router(admin.router, responses=LIMIT_ERROR_RESPONSES)
    app.include_router(metrics.router, dependencies=METRICS_KEY_DEPENDENCIES, responses=protected)
    app.include_router(v2.fallback_router)  # last: unknown /v2 paths get a v2-style 404
    app.add_middleware(
        RequestLimitsMiddleware, max_body_bytes=settings.max_body_bytes, timeout_seconds=settings.request_timeout_seconds
    )
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    return app
