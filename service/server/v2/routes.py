"""Open Inference Protocol v2 (KServe / Triton REST): health, server and model metadata, readiness and
`infer` with JSON or binary tensors (the codec is `oodserve.server.v2.codec`).

Errors are `{"error": "..."}` (the routers' `V2Route`): 400 for a bad request, 404 for an unknown model or
version, 503 when not ready or overloaded (with Retry-After), 504 past the scoring deadline.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from oodserve import __version__
from oodserve.server.body import read_body_limited
from oodserve.server.deps import StateDep, VersionedEngineDep
from oodserve.server.drift import STREAM_HEADER
from oodserve.server.errors import V2_ENVELOPE, ApiError, V2Route
from oodserve.server.state import app_state
from oodserve.server.v2.codec import HEADER_LENGTH, InferRequest, infer_response, model_metadata, output_specs, parse_infer_request


def json_response(content: Any, status_code: int = 200) -> Response:
    return Response(orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY), status_code=status_code, media_type="application/json")


health_router = APIRouter(prefix="/v2", tags=["v2"], route_class=V2Route)
"""Server metadata and health: never behind a key."""
router = APIRouter(prefix="/v2", tags=["v2"], route_class=V2Route)
"""Model metadata, readiness and inference."""
fallback_router = APIRouter(prefix="/v2", tags=["v2"], route_class=V2Route, include_in_schema=False)
"""Unknown paths under /v2, answered 404 in the v2 error form (include last)."""


@health_router.get("", summary="v2 server metadata")
async def server_metadata() -> Response:
    return json_response({"name": "oodserve", "version": __version__, "extensions": ["binary_tensor_data"]})


@health_router.get("/health/live", summary="v2 liveness: the process is up")
async def server_live() -> Response:
    return json_response({"live": True})


@health_router.get("/health/ready", summary="v2 readiness: every bundle loaded and warmed up (503 before)")
async def server_ready(state: StateDep) -> Response:
    state.ready_registry()
    return json_response({"ready": True})


@router.get("/models/{name}", summary="v2 model metadata: input and output tensors")
@router.get("/models/{name}/versions/{version}", summary="v2 model metadata of one version")
async def get_model_metadata(engine: VersionedEngineDep) -> Response:
    return json_response(model_metadata(engine))


@router.get("/models/{name}/ready", summary="v2 model readiness")
@router.get("/models/{name}/versions/{version}/ready", summary="v2 readiness of one model version")
async def get_model_ready(engine: VersionedEngineDep) -> Response:
    return json_response({"name": engine.name, "ready": True})


@router.post("/models/{name}/infer", summary="v2 inference: verdicts, p-values, scores, signals, class index")
@router.post("/models/{name}/versions/{version}/infer", summary="v2 inference with one model version")
async def infer(request: Request, engine: VersionedEngineDep) -> Response:
    state = app_state(request)
    settings = state.settings
    stream = request.headers.get(STREAM_HEADER)
    encoding = (request.headers.get("content-encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise ApiError(400, "bad_request", f"Content-Encoding {encoding!r} is not supported; send the body uncompressed")

    async def decode() -> InferRequest:
        body = await read_body_limited(request, settings.max_body_bytes)
        outputs = [output_name for output_name, _ in output_specs(engine)]
        return parse_infer_request(body, request.headers.get(HEADER_LENGTH), engine.manifest.input, settings.max_batch_instances, outputs)

    parsed, scores = await state.plane.score(engine, stream, decode)
    return infer_response(engine, scores, parsed)


@fallback_router.api_route("/{path:path}", methods=["GET", "POST", "PUT", "DELETE", "PATCH"])
async def unknown_v2_path(request: Request, path: str) -> Response:
    return V2_ENVELOPE.response(404, "not_found", f"no v2 route {request.method} /v2/{path}")
