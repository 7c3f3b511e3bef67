"""v1 API: model summaries and scoring of JSON instances."""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from service.api.body import parse_score_request, read_json_request
from service.api.deps import MetricsDep, NamedEngineDep, RegistryDep, SettingsDep
from service.api.errors import ApiError
from service.api.responses import OrjsonResponse
from service.api.schemas import ERROR_RESPONSES, ScoreRequest, ScoreResponse
from service.engine import Engine
from service.metrics import ServiceMetrics
from service.scoring.inputs import InputError, instances_to_array
from service.scoring.pipeline import InstanceResult

router = APIRouter(prefix="/v1", tags=["v1"])

_SCORE_DOCS: dict[str, Any] = {
    "response_model": None,
    "responses": {200: {"model": ScoreResponse}, **ERROR_RESPONSES},
    "openapi_extra": {
        "requestBody": {"required": True, "content": {"application/json": {"schema": ScoreRequest.model_json_schema()}}}
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


def _validate_and_score(engine: Engine, instances: list[Any], alpha: float | None, metrics: ServiceMetrics) -> dict[str, Any]:
    """Runs in a worker thread: JSON instances -> checked batch -> scores -> response body."""
    spec = engine.manifest.input
    started = time.perf_counter()
    try:
        images = instances_to_array(instances, spec.shape, spec.dtype, spec.min, spec.max)
    except InputError as error:
        raise ApiError(422, error.code, error.message) from error
    scores = engine.score(images, alpha)
    results = scores.to_instance_results(engine.manifest.labels)
    metrics.observe_batch(engine.name, scores, time.perf_counter() - started)
    body = {
        "model": engine.name,
        "model_version": engine.version,
        "alpha": scores.alpha,
        "results": [result_to_json(result) for result in results],
    }
    batch = engine.batch_test(scores)
    if batch is not None:
        body["batch"] = batch
    return body


async def _score(request: Request, engine: Engine, settings: SettingsDep, metrics: MetricsDep) -> OrjsonResponse:
    payload = await read_json_request(request, settings.max_body_bytes)
    instances, alpha = parse_score_request(payload, settings.max_batch_instances)
    body = await run_in_threadpool(_validate_and_score, engine, instances, alpha, metrics)
    return OrjsonResponse(body)


@router.get("/models", summary="Served models: manifest summary, signals, labels, active provider")
async def list_models(registry: RegistryDep) -> OrjsonResponse:
    return OrjsonResponse({"default": registry.default_name, "models": [engine.describe() for engine in registry]})


@router.get("/models/{name}", summary="One served model", responses=ERROR_RESPONSES)
async def get_model(engine: NamedEngineDep) -> OrjsonResponse:
    return OrjsonResponse(engine.describe())


@router.post("/score", summary="Score instances with the default model", **_SCORE_DOCS)
async def score_default(request: Request, registry: RegistryDep, settings: SettingsDep, metrics: MetricsDep) -> OrjsonResponse:
    return await _score(request, registry.default, settings, metrics)


@router.post("/models/{name}/score", summary="Score instances with the named model", **_SCORE_DOCS)
async def score_named(request: Request, engine: NamedEngineDep, settings: SettingsDep, metrics: MetricsDep) -> OrjsonResponse:
    return await _score(request, engine, settings, metrics)
