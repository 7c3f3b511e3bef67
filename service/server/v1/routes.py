"""v1 API: model summaries and scoring of JSON, .npy, PNG and multipart PNG bodies."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from oodserve.engine import Engine
from oodserve.scoring.pipeline import BatchScores, InstanceResult
from oodserve.server.deps import NamedEngineDep, RegistryDep
from oodserve.server.drift import STREAM_HEADER
from oodserve.server.responses import OrjsonResponse
from oodserve.server.schemas import ERROR_RESPONSES, ScoreRequest, ScoreResponse
from oodserve.server.state import app_state
from oodserve.server.v1.scoring import read_score_images

router = APIRouter(prefix="/v1", tags=["v1"])

_SCORE_DOCS: dict[str, Any] = {
    "response_model": None,
    "responses": {200: {"model": ScoreResponse}, **ERROR_RESPONSES},
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


def result_to_json(result: InstanceResult) -> dict[str, Any]:
    """One result object of the response; `prediction` only when the bundle has a classifier."""
    body: dict[str, Any] = {
        "is_ood": result.is_ood,
        "score": result.score,
        "p_value": result.p_value,
        "signals": result.signals,
        "p_values": result.p_values,
    }
    if result.prediction is not None:
        body["prediction"] = {
            "class_index": result.prediction.class_index,
            "label": result.prediction.label,
            "confidence": result.prediction.confidence,
        }
    return body


def score_response_body(engine: Engine, scores: BatchScores) -> dict[str, Any]:
    """The v1 response: model, version, alpha, one result per instance and the batch test when declared."""
    body: dict[str, Any] = {
        "model": engine.name,
        "model_version": engine.version,
        "alpha": scores.alpha,
        "results": [result_to_json(result) for result in scores.to_instance_results(engine.manifest.labels)],
    }
    batch = engine.batch_test(scores)
    if batch is not None:
        body["batch"] = batch
    return body


async def score_request(request: Request, engine: Engine) -> OrjsonResponse:
    """Any accepted body type through the data plane's score sequence; the v1 response body back."""
    state = app_state(request)
    stream = request.headers.get(STREAM_HEADER)
    _, scores = await state.plane.score(engine, stream, lambda: read_score_images(request, engine, state.settings))
    return OrjsonResponse(score_response_body(engine, scores))


@router.get("/models", summary="Served models: manifest summary, signals, labels, active provider")
async def list_models(registry: RegistryDep) -> OrjsonResponse:
    return OrjsonResponse({"default": registry.default_name, "models": [engine.describe() for engine in registry]})


@router.get("/models/{name}", summary="One served model", responses=ERROR_RESPONSES)
async def get_model(engine: NamedEngineDep) -> OrjsonResponse:
    return OrjsonResponse(engine.describe())


@router.post("/score", summary="Score instances with the default model", **_SCORE_DOCS)
async def score_default(request: Request, registry: RegistryDep) -> OrjsonResponse:
    return await score_request(request, registry.default)


@router.post("/models/{name}/score", summary="Score instances with the named model", **_SCORE_DOCS)
async def score_named(request: Request, engine: NamedEngineDep) -> OrjsonResponse:
    return await score_request(request, engine)
