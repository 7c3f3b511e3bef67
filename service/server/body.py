"""Reading request bodies: content type, size (declared and streamed), JSON syntax and depth; JSON type names and the alpha check."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import orjson
from fastapi import Request

from oodserve.server.errors import ApiError
from oodserve.server.middleware.limits import check_json_depth
from oodserve.server.state import app_state


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
    check_json_depth(body, app_state(request).settings.max_json_depth)
    return parse_json(body)


async def read_optional_json_object(request: Request, max_bytes: int, fields: Sequence[str], example: str) -> dict[str, Any] | None:
    """An optional JSON object body with only `fields`: None for an empty body; else the content type (415),
    size (413), JSON syntax (400) and object shape with no other keys (422) are checked. `example` shows the
    expected object in the error message."""
    body = await read_body_limited(request, max_bytes)
    if not body.strip():
        return None
    content_type = request.headers.get("content-type")
    if not is_json_media_type(content_type):
        raise ApiError(415, "unsupported_media_type", f"expected Content-Type application/json, got {content_type or 'none'}")
    payload = parse_json(body)
    if not isinstance(payload, dict):
        raise ApiError(422, "invalid_request", f"body must be a JSON object like {example}, got a JSON {json_type_name(payload)}")
    unknown = sorted(key for key in payload if key not in fields)
    if unknown:
        allowed = f"the only field is `{fields[0]}`" if len(fields) == 1 else f"allowed fields are {list(fields)}"
        raise ApiError(422, "invalid_request", f"unknown fields {unknown}; {allowed}")
    return payload


def json_type_name(value: Any) -> str:
    """The JSON name of a parsed value's type (object, array, string, number, boolean, null)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    names: dict[type, str] = {dict: "object", list: "array", str: "string"}
    return names.get(type(value), type(value).__name__)
