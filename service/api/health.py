"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request

from service.api.errors import error_response
from service.api.responses import OrjsonResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> OrjsonResponse:
    return OrjsonResponse({"status": "ok"})


@router.get("/readyz", summary="Readiness: bundles loaded and warmed up (503 before)")
async def readyz(request: Request) -> OrjsonResponse:
    registry = request.app.state.registry
    if not request.app.state.ready or registry is None:
        return error_response(503, "not_ready", "bundles are not loaded and warmed up yet")
    return OrjsonResponse({"status": "ready", "models": sorted(registry.engines)})
