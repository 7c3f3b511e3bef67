"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response

from oodserve.server.errors import error_response
from oodserve.server.responses import OrjsonResponse
from oodserve.server.state import app_state

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> OrjsonResponse:
    return OrjsonResponse({"status": "ok"})


@router.get("/readyz", summary="Readiness: bundles loaded and warmed up (503 before)")
async def readyz(request: Request) -> Response:
    state = app_state(request)
    registry = state.registry
    if not state.ready or registry is None:
        return error_response(503, "not_ready", "bundles are not loaded and warmed up yet")
    return OrjsonResponse({"status": "ready", "models": sorted(registry.engines)})
