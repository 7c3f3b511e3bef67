"""Reading and checking score request bodies: content type, size (declared and streamed), JSON, fields."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
from fastapi import Request

from service.api.errors import ApiError
from service.limits import check_json_depth

ALLOWED_REQUEST_KEYS = ("instances", "alpha")


def is_json_media_type(content_type: str | None) -> bool:
    """application/json or any application/*+json, parameters such as charset ignored."""
    if not content_type:
        return False
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


async def read_body_limited(request: Request, max_bytes: int) -> bytes:
    """The raw body; 413 if Content-Length or the bytes actually streamed exceed max_bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError as error:
            raise ApiError(400, "bad_request", f"Content-Length must be an integer, got {declared!r}") from error
        if declared_bytes > max_bytes:
            raise ApiError(413, "body_too_large", f"request body is {declared_bytes} bytes; the limit is {max_bytes} bytes")
    chunks: list[bytes] = []
    received = 0
    async for chunk in request.stream():
        received += len(chunk)
        if received > max_bytes:
            raise ApiError(413, "body_too_large", f"request body exceeds the limit of {max_bytes} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """Parse JSON with orjson; bodies orjson refuses only for NaN/Infinity literals are re-read with the
    standard library so such values get a 422 naming them instead of a 400."""
    if not body.strip():
        raise ApiError(400, "malformed_json", "request body is empty; expected a JSON object with `instances`")
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as error:
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise ApiError(400, "malformed_json", f"request body is not valid JSON: {error}") from error


async def read_json_request(request: Request, max_bytes: int) -> Any:
    """Content type (415), size (413), nesting depth and JSON syntax (400) checks, in that order."""
    content_type = request.headers.get("content-type")
    if not is_json_media_type(content_type):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"expected Content-Type application/json, got {content_type or 'none'}",
        )
    body = await read_body_limited(request, max_bytes)
    check_json_depth(body, request.app.state.settings.max_json_depth)
    return parse_json(body)


def json_type_name(value: Any) -> str:
    """The JSON name of a parsed value's type (object, array, string, number, boolean, null)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    return {dict: "object", list: "array", str: "string"}.get(type(value), type(value).__name__)


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
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0.0 < alpha < 1.0:
            raise ApiError(422, "invalid_alpha", f"`alpha` must be a number in (0, 1), got {alpha!r}")
        alpha = float(alpha)
    return instances, alpha
