"""Score requests of every body type (JSON, .npy, PNG, multipart PNG) to a validated batch."""

from __future__ import annotations

from typing import Any

import numpy as np
from fastapi import Request
from starlette.concurrency import run_in_threadpool

from oodserve.config import Settings
from oodserve.dataplane import DecodedInput, checked_alpha
from oodserve.engine import Engine
from oodserve.scoring.inputs import instances_to_array
from oodserve.scoring.payloads import JPEG_ONLY, PNG_ONLY, npy_to_images, pngs_to_images
from oodserve.server.body import is_json_media_type, json_type_name, read_body_limited, read_json_request
from oodserve.server.errors import ApiError
from oodserve.server.v1.binary import JPEG_MEDIA_TYPE, MULTIPART_MEDIA_TYPE, NPY_MEDIA_TYPE, PNG_MEDIA_TYPE, multipart_to_images

SCORE_MEDIA_TYPES = ("application/json", NPY_MEDIA_TYPE, PNG_MEDIA_TYPE, JPEG_MEDIA_TYPE, MULTIPART_MEDIA_TYPE)
INLINE_JSON_INSTANCES = 4
"""JSON batches up to this many instances are checked on the event loop; larger ones in a thread."""


ALLOWED_REQUEST_KEYS = ("instances", "alpha")


def parse_alpha_text(text: str | None, where: str) -> float | None:
    """An alpha given as text (query parameter or form field): None, or a number in (0, 1) (else 422)."""
    if text is None:
        return None
    try:
        value = checked_alpha(float(text))
    except ValueError:
        value = None
    if value is None:
        raise ApiError(422, "invalid_alpha", f"{where} `alpha` must be a number in (0, 1), got {text!r}")
    return value


def parse_score_request(payload: Any, max_instances: int) -> tuple[list[Any], float | None]:
    """Check the request object's fields: `instances` (a list, at most max_instances: else 413) and `alpha`."""
    if not isinstance(payload, dict):
        raise ApiError(422, "invalid_request", f"request body must be a JSON object with `instances`, got a JSON {json_type_name(payload)}")
    unknown = sorted(key for key in payload if key not in ALLOWED_REQUEST_KEYS)
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown fields {unknown}; allowed fields are {list(ALLOWED_REQUEST_KEYS)}")
    if "instances" not in payload:
        raise ApiError(422, "invalid_request", "request body needs `instances`: a JSON array of instances")
    instances = payload["instances"]
    if isinstance(instances, list) and len(instances) > max_instances:
        raise ApiError(413, "too_many_instances", f"got {len(instances)} instances; at most {max_instances} per request")
    alpha = payload.get("alpha")
    if alpha is None:
        return instances, None
    level = checked_alpha(alpha)
    if level is None:
        raise ApiError(422, "invalid_alpha", f"`alpha` must be a number in (0, 1), got {alpha!r}")
    return instances, level


def media_type_of(request: Request) -> str:
    content_type = request.headers.get("content-type") or ""
    return content_type.split(";", 1)[0].strip().lower()


def json_instances_to_images(engine: Engine, instances: list[object]) -> np.ndarray:
    spec = engine.manifest.input
    return instances_to_array(instances, spec.shape, spec.dtype, spec.min, spec.max)


async def read_score_images(request: Request, engine: Engine, settings: Settings) -> DecodedInput:
    """The request's images (N, *input_shape) float32 and alpha, from any accepted body type (the v1 codec).

    JSON `{"instances", "alpha"}`; application/x-npy (N, *instance shape); image/png or image/jpeg (one image);
    multipart/form-data (PNG files, optional `alpha` field). `?alpha=` applies when the body names none.
    """
    query_alpha = parse_alpha_text(request.query_params.get("alpha"), "query parameter")
    spec = engine.manifest.input
    media_type = media_type_of(request)
    if media_type in (NPY_MEDIA_TYPE, PNG_MEDIA_TYPE, JPEG_MEDIA_TYPE, MULTIPART_MEDIA_TYPE):
        body = await read_body_limited(request, settings.max_body_bytes)
        if media_type == NPY_MEDIA_TYPE:
            return DecodedInput(npy_to_images(body, spec, settings.max_batch_instances), query_alpha)
        if media_type in (PNG_MEDIA_TYPE, JPEG_MEDIA_TYPE):
            named, kinds = (("the PNG body", PNG_ONLY) if media_type == PNG_MEDIA_TYPE else ("the JPEG body", JPEG_ONLY))
            return DecodedInput(pngs_to_images([(named, body)], spec, settings.max_batch_instances, kinds), query_alpha)
        images, form_alpha = await multipart_to_images(request.headers, body, spec, settings.max_batch_instances)
        alpha = parse_alpha_text(form_alpha, "form field")
        return DecodedInput(images, query_alpha if alpha is None else alpha)
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
    return DecodedInput(images, query_alpha if alpha is None else alpha)
