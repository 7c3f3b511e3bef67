"""v1 API: model summaries and scoring of JSON, .npy, PNG and multipart PNG bodies."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from oodserve.dataplane import ModelDescription, ModelList, ScoreResponse, describe_model, score_response
from oodserve.engine import Engine
from oodserve.server.deps import NamedEngineDep, RegistryDep
from oodserve.server.drift import STREAM_HEADER
from oodserve.server.responses import OrjsonResponse
from oodserve.server.schemas import ERROR_RESPONSES, ScoreRequest
from oodserve.server.state import app_state
from oodserve.server.v1.scoring import read_score_images

router = APIRouter(prefix="/v1", tags=["v1"])

_SCORE_DOCS: dict[str, Any] = {
    "response_model": ScoreResponse,  # documents the body: score_response builds it from the same model
    "responses": ERROR_RESPONSES,
    "openapi_extra": {
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": ScoreRequest.model_json_schema()},
                "application/x-npy": {"schema": {"type": "string", "format": "binary", "description": "np.save of (N, *instance shape)"}},
                "image/png": {
                    "schema": {"type": "string", "format": "binary", "description": "one image, 8-bit greyscale after conversion"}
                },
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {
                            "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                            "alpha": {"type": "number"},
                        },
                    }
                },
            },
        }
    },
}


async def score_request(request: Request, engine: Engine) -> OrjsonResponse:
    """Any accepted body type through the data plane's score sequence; the v1 response body back."""
    state = app_state(request)
    stream = request.headers.get(STREAM_HEADER)
    _, scores = await state.plane.score(engine, stream, lambda: read_score_images(request, engine, state.settings))
    return OrjsonResponse(score_response(engine, scores).to_python())


@router.get("/models", summary="Served models: manifest summary, signals, labels, active provider", response_model=ModelList)
async def list_models(registry: RegistryDep) -> OrjsonResponse:
    models = [describe_model(engine) for engine in registry]
    return OrjsonResponse(ModelList.model_construct(default=registry.default_name, models=models).model_dump())


@router.get("/models/{name}", summary="One served model", responses=ERROR_RESPONSES, response_model=ModelDescription)
async def get_model(engine: NamedEngineDep) -> OrjsonResponse:
    return OrjsonResponse(describe_model(engine).model_dump())


@router.post("/score", summary="Score instances with the default model", **_SCORE_DOCS)
async def score_default(request: Request, registry: RegistryDep) -> OrjsonResponse:
    return await score_request(request, registry.default)


@router.post("/models/{name}/score", summary="Score instances with the named model", **_SCORE_DOCS)
async def score_named(request: Request, engine: NamedEngineDep) -> OrjsonResponse:
    return await score_request(request, engine)
