"""Drift API: the streams' online tests per model (`GET /v1/models/{name}/drift`), their restart by an admin
(`POST /v1/admin/drift/reset`). Scored batches enter their stream's tests in the data plane (`DataPlane.observe_stream`);
the stream is named by the `X-OOD-Stream` header (`STREAM_HEADER`) or gRPC metadata `x-ood-stream`.

With a shared store (OODSERVE_DRIFT_STORE=redis://...) the endpoint reads the store within its short timeout; when
it cannot, it answers 200 with `store.status` = `unavailable` and no streams (scoring is unaffected), and a reset
answers 503 with Retry-After."""

from __future__ import annotations

import redis
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from oodserve.drift.store import DriftStore
from oodserve.server.body import json_type_name, read_optional_json_object
from oodserve.server.deps import NamedEngineDep, StateDep
from oodserve.server.errors import ApiError
from oodserve.server.responses import OrjsonResponse
from oodserve.server.schemas import ERROR_RESPONSES, error_responses
from oodserve.server.security import ADMIN_KEY_DEPENDENCIES
from oodserve.server.state import AppState

STREAM_HEADER = "x-ood-stream"
MAX_RESET_BODY_BYTES = 4096

router = APIRouter(prefix="/v1", tags=["drift"])
admin_router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=ADMIN_KEY_DEPENDENCIES)


def _monitor(state: AppState) -> DriftStore:
    if state.drift is None:
        raise ApiError(404, "drift_disabled", "drift tests are off (OODSERVE_DRIFT=false)")
    return state.drift


@router.get("/models/{name}/drift", summary="The model's streams: martingale, change statistic, alarms", responses=ERROR_RESPONSES)
async def get_drift(engine: NamedEngineDep, state: StateDep) -> OrjsonResponse:
    monitor = _monitor(state)
    snapshot = await run_in_threadpool(monitor.snapshot, engine.name)
    return OrjsonResponse({
        "model": engine.name,
        **monitor.describe(),
        "store": snapshot.store,
        "streams_evicted": snapshot.evicted.get(engine.name, 0),
        "streams": [report.to_json() for report in snapshot.reports],
    })


async def _read_reset_request(request: Request) -> tuple[str | None, str | None]:
    payload = await read_optional_json_object(request, MAX_RESET_BODY_BYTES, ("model", "stream"), '{"model": NAME, "stream": ID}')
    if payload is None:
        return None, None
    for key in ("model", "stream"):
        if payload.get(key) is not None and not isinstance(payload[key], str):
            raise ApiError(422, "invalid_request", f"`{key}` must be a string, got a JSON {json_type_name(payload[key])}")
    return payload.get("model"), payload.get("stream")


_RESET_ERRORS = error_responses({
    400: "Body is not valid JSON.",
    401: "No admin key sent (`Authorization: Bearer KEY`).",
    403: "Wrong admin key, or admin endpoints disabled (no OODSERVE_ADMIN_KEYS).",
    404: "Unknown model, or drift tests switched off (OODSERVE_DRIFT=false).",
    413: "Body too large.",
    415: "Body sent with a Content-Type other than application/json.",
    422: "Invalid body: fields other than `model` and `stream`, or not strings.",
    503: "The service is still starting, or the shared drift store did not answer in time.",
})


@admin_router.post(
    "/drift/reset", summary="Restart the drift tests of every stream, one model's, or one stream's", responses=_RESET_ERRORS
)
async def reset_drift(request: Request, state: StateDep) -> OrjsonResponse:
    monitor = _monitor(state)
    model, stream = await _read_reset_request(request)
    if model is not None:
        state.ready_registry().require(model)
    try:
        count = await run_in_threadpool(monitor.reset, model, stream)
    except redis.RedisError as error:
        raise ApiError(503, "drift_store_unavailable", f"the drift store did not answer ({type(error).__name__}); retry later",
                       headers={"Retry-After": "5"}) from error
    return OrjsonResponse({"status": "reset", "streams": count, "model": model, "stream": stream})
