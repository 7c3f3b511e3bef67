"""Score requests of every body type to a validated batch, then through the batch scheduler with its
refusals as HTTP errors (503 + Retry-After when the queue is full, 504 past the deadline)."""

from __future__ import annotations

import math

import numpy as np
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from service.api.binary import (
    MULTIPART_MEDIA_TYPE,
    NPY_MEDIA_TYPE,
    PNG_MEDIA_TYPE,
    multipart_to_images,
    npy_to_images,
    pngs_to_images,
)
from service.api.body import is_json_media_type, parse_score_request, read_body_limited, read_json_request
from service.api.errors import ApiError
from service.config import Settings
from service.engine import Engine
from service.runtime.batching import Arrival, BatchScheduler, DeadlineExceededError, QueueFullError
from service.scoring.inputs import InputError, instances_to_array
from service.scoring.pipeline import BatchScores

SCORE_MEDIA_TYPES = ("application/json", NPY_MEDIA_TYPE, PNG_MEDIA_TYPE, MULTIPART_MEDIA_TYPE)
INLINE_JSON_INSTANCES = 4
"""JSON batches up to this many instances are checked on the event loop; larger ones in a thread."""


def parse_alpha_text(text: str | None, where: str) -> float | None:
    """An alpha given as text (query parameter or form field): None, or a number in (0, 1) (else 422)."""
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or not 0.0 < value < 1.0:
        raise ApiError(422, "invalid_alpha", f"{where} `alpha` must be a number in (0, 1), got {text!r}")
    return value


def media_type_of(request: Request) -> str:
    content_type = request.headers.get("content-type") or ""
    return content_type.split(";", 1)[0].strip().lower()


def json_instances_to_images(engine: Engine, instances: list[object]) -> np.ndarray:
    spec = engine.manifest.input
    try:
        return instances_to_array(instances, spec.shape, spec.dtype, spec.min, spec.max)
    except InputError as error:
        raise ApiError(422, error.code, error.message) from error


async def read_score_images(request: Request, engine: Engine, settings: Settings) -> tuple[np.ndarray, float | None]:
    """The request's images (N, *input_shape) float32 and alpha, from any accepted body type.

    JSON `{"instances", "alpha"}`; application/x-npy (N, *instance shape); image/png (one image);
    multipart/form-data (PNG files, optional `alpha` field). `?alpha=` applies when the body names none.
    """
    query_alpha = parse_alpha_text(request.query_params.get("alpha"), "query parameter")
    spec = engine.manifest.input
    media_type = media_type_of(request)
    if media_type in (NPY_MEDIA_TYPE, PNG_MEDIA_TYPE, MULTIPART_MEDIA_TYPE):
        body = await read_body_limited(request, settings.max_body_bytes)
        if media_type == NPY_MEDIA_TYPE:
            return npy_to_images(body, spec, settings.max_batch_instances), query_alpha
        if media_type == PNG_MEDIA_TYPE:
            return pngs_to_images([("the PNG body", body)], spec, settings.max_batch_instances), query_alpha
        images, form_alpha = await multipart_to_images(request.headers, body, spec, settings.max_batch_instances)
        alpha = parse_alpha_text(form_alpha, "form field")
        return images, query_alpha if alpha is None else alpha
    if not is_json_media_type(request.headers.get("content-type")):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"expected Content-Type {', '.join(SCORE_MEDIA_TYPES)}, got {request.headers.get('content-type') or 'none'}",
        )
    payload = await read_json_request(request, settings.max_body_bytes)
    instances, alpha = parse_score_request(payload, settings.max_batch_instances)
    if isinstance(instances, list) and len(instances) > INLINE_JSON_INSTANCES:
        images = await run_in_threadpool(json_instances_to_images, engine, instances)
    else:
        images = json_instances_to_images(engine, instances)
    return images, query_alpha if alpha is None else alpha


async def schedule_scoring(
    scheduler: BatchScheduler, engine: Engine, images: np.ndarray, alpha: float | None, arrival: Arrival | None = None
) -> BatchScores:
    """scheduler.score with QueueFullError -> 503 `overloaded` + Retry-After, DeadlineExceededError -> 504."""
    try:
        return await scheduler.score(engine, images, alpha, arrival)
    except QueueFullError as error:
        raise ApiError(503, "overloaded", str(error), headers={"Retry-After": str(error.retry_after_s)}) from error
    except DeadlineExceededError as error:
        raise ApiError(504, "deadline_exceeded", str(error)) from error
