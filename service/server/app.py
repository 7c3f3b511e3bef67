"""The FastAPI application factory: settings, metrics, routers, error handlers, and a lifespan that
loads + verifies bundles and warms them up before readiness."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from starlette.concurrency import run_in_threadpool

from oodserve import __version__
from oodserve.config import Settings
from oodserve.drift.factory import create_drift_store
from oodserve.drift.monitor import DriftSettings
from oodserve.drift.store import StoreOptions
from oodserve.engine import EngineRegistry, load_registry
from oodserve.observability.metrics import ServiceMetrics
from oodserve.runtime.batching import BatchingOptions, BatchScheduler
from oodserve.runtime.sessions import RuntimeOptions
from oodserve.server import admin, console, drift, health, metrics_endpoint
from oodserve.server.errors import install_error_handlers
from oodserve.server.hot_path import Handler, HotPathMiddleware, hot_routes
from oodserve.server.middleware.limits import LIMIT_ERROR_RESPONSES, RequestLimitsMiddleware
from oodserve.server.middleware.request_metrics import RequestMetricsMiddleware
from oodserve.server.reload import install_sighup_reload
from oodserve.server.responses import OrjsonResponse
from oodserve.server.schemas import ERROR_RESPONSES, v2_error_responses
from oodserve.server.security import AUTH_ERROR_RESPONSES, METRICS_KEY_DEPENDENCIES, SCORING_KEY_DEPENDENCIES
from oodserve.server.state import STATE_KEY, AppState, app_state
from oodserve.server.v1 import evidence, generation
from oodserve.server.v1 import routes as v1
from oodserve.server.v2 import routes as v2
from oodserve.server.v2_grpc.service import start_grpc_server

logger = logging.getLogger("oodserve.app")


def load_registry_from_settings(settings: Settings) -> EngineRegistry:
    """Verify and load settings.bundle (the default model) and settings.extra_bundles."""
    return load_registry([settings.bundle, *settings.extra_bundles], RuntimeOptions.from_settings(settings))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Load bundles unless given, warm every engine up, then mark the service ready; unready on shutdown."""
    state = app_state(app)
    settings = state.settings
    if state.registry is None:
        state.registry = await run_in_threadpool(load_registry_from_settings, settings)
    registry = state.registry
    for engine in registry:
        await run_in_threadpool(engine.warm_up, settings.warmup_batch_size)
    state.metrics.track_registry(registry)
    grpc_server = None
    if settings.grpc_port is not None:  # bound before readiness: a port that cannot be bound fails the start-up

        grpc_server, state.grpc_port = await start_grpc_server(state, settings.host, settings.grpc_port)
    state.ready = True
    state.metrics.ready.set(1)
    logger.info("ready: serving %s (default %s)", sorted(registry.engines), registry.default_name)
    uninstall_sighup = install_sighup_reload(state.reloader) if settings.reload_on_sighup else None
    try:
        yield
    finally:
        if grpc_server is not None:  # HTTP has drained by now; calls still in flight get a short grace
            await grpc_server.stop(min(5.0, settings.shutdown_grace_seconds))
        if uninstall_sighup is not None:
            uninstall_sighup()
        state.ready = False
        state.metrics.ready.set(0)
        await state.batching.close()
        if state.drift is not None:  # a shared store gets what is still queued (briefly), then its connections close
            await asyncio.to_thread(state.drift.close)


def create_app(settings: Settings | None = None, registry: EngineRegistry | None = None) -> FastAPI:
    """Build the app. With `registry` the given engines are served, else the lifespan loads settings.bundle.

    Usable as `uvicorn --factory oodserve.server.app:create_app` (settings from OODSERVE_* variables).
    """
    settings = settings or Settings()
    app = FastAPI(
        title="oodserve",
        version=__version__,
        description="Out-of-distribution detection: normalizing flows and SNGP in ONNX, conformal p-values, fused verdicts.",
        default_response_class=OrjsonResponse,
        lifespan=lifespan,
        docs_url=None,  # served by oodserve.server.console from packaged assets, never from a CDN
        redoc_url=None,
    )
    metrics = ServiceMetrics(ood_rate_window=settings.ood_rate_window)
    state = AppState(
        settings=settings,
        metrics=metrics,
        batching=BatchScheduler(BatchingOptions.from_settings(settings), on_queue_wait=metrics.observe_queue_wait),
        registry=registry,
        drift=create_drift_store(DriftSettings.from_settings(settings), StoreOptions.from_settings(settings)) if settings.drift else None,
    )
    setattr(app.state, STATE_KEY, state)
    metrics.track_scheduler(state.batching)
    if state.drift is not None:
        metrics.track_drift(state.drift)
    install_error_handlers(app)
    protected = {**AUTH_ERROR_RESPONSES, **LIMIT_ERROR_RESPONSES}  # documented so schema checks hold
    v2_errors = v2_error_responses({**ERROR_RESPONSES, **protected})  # v2 answers {"error": "..."}
    routers: list[tuple[APIRouter, list[Any], dict[int | str, dict[str, Any]]]] = [
        (health.router, [], LIMIT_ERROR_RESPONSES),
        (v1.router, SCORING_KEY_DEPENDENCIES, protected),
        (drift.router, SCORING_KEY_DEPENDENCIES, protected),
        (generation.router, SCORING_KEY_DEPENDENCIES, protected),
        (evidence.router, SCORING_KEY_DEPENDENCIES, protected),
        (v2.health_router, [], v2_errors),
        (v2.router, SCORING_KEY_DEPENDENCIES, v2_errors),
        (admin.router, [], LIMIT_ERROR_RESPONSES),
        (drift.admin_router, [], LIMIT_ERROR_RESPONSES),
        (metrics_endpoint.router, METRICS_KEY_DEPENDENCIES, protected),
        (v2.fallback_router, [], {}),  # last: unknown /v2 paths get a v2-style 404
    ]
    if settings.console:
        routers.insert(0, (console.router, [], {}))
    for router, dependencies, responses in routers:
        app.include_router(router, dependencies=dependencies, responses=responses)
    routes = [route for router, _, _ in routers for route in router.routes]
    if settings.lean_routes:  # innermost: behind the request limits and metrics, in front of FastAPI's routing
        lean: dict[str, Handler] = {"/v1/score": v1.score_request, "/v1/models/{name}/score": v1.score_request}
        lean |= {"/v2/models/{name}/infer": v2.infer, "/v2/models/{name}/versions/{version}/infer": v2.infer}
        app.add_middleware(HotPathMiddleware, state=state, routes=hot_routes(routes, lean))
    app.add_middleware(
        RequestLimitsMiddleware,
        max_body_bytes=settings.max_body_bytes,
        timeout_seconds=settings.request_timeout_seconds,
        routes=routes,  # to word errors per router
    )
    app.add_middleware(RequestMetricsMiddleware, metrics=metrics)
    return app
