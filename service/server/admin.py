"""Admin API (admin keys only; disabled without OODSERVE_ADMIN_KEYS): hot reload of the served bundles."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field

from oodserve.server.body import json_type_name, read_optional_json_object
from oodserve.server.deps import StateDep
from oodserve.server.errors import ApiError
from oodserve.server.responses import OrjsonResponse
from oodserve.server.schemas import error_responses
from oodserve.server.security import ADMIN_KEY_DEPENDENCIES

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=ADMIN_KEY_DEPENDENCIES)

MAX_ADMIN_BODY_BYTES = 16 * 1024


class ReloadRequest(BaseModel):
    """Optional body of POST /v1/admin/reload."""

    model_config = ConfigDict(extra="forbid")

    bundle: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="Directory of the bundle that becomes the default model; default: reload the served directories.",
    )


class ReloadedModel(BaseModel):
    name: str
    version: str
    bundle: str


class ReloadResponse(BaseModel):
    status: str = Field(description="`reloaded`.")
    default: str
    models: list[ReloadedModel]
    seconds: float = Field(description="Time to verify, load and warm up the new bundles.")


_ADMIN_ERRORS = error_responses({
    400: "Body is not valid JSON.",
    401: "No admin key sent (`Authorization: Bearer KEY`).",
    403: "Wrong admin key, or admin endpoints disabled (no OODSERVE_ADMIN_KEYS).",
    409: "Another reload is running.",
    413: "Body too large.",
    415: "Body sent with a Content-Type other than application/json.",
    422: "Invalid body, or the bundle was refused (the message says why); the old bundles keep serving.",
    500: "The reload failed unexpectedly; the old bundles keep serving.",
    503: "The service is still starting.",
})


async def read_reload_request(request: Request) -> Path | None:
    """The optional `bundle` path of the body: empty body = none; else JSON (415/400) {"bundle": str} (422)."""
    payload = await read_optional_json_object(request, MAX_ADMIN_BODY_BYTES, ("bundle",), '{"bundle": PATH}')
    if payload is None:
        return None
    bundle = payload.get("bundle")
    if bundle is None:
        return None
    if not isinstance(bundle, str) or not bundle.strip() or len(bundle) > 4096 or "\x00" in bundle:
        raise ApiError(422, "invalid_request", f"`bundle` must be a directory path (a non-empty string), got {json_type_name(bundle)}")
    return Path(bundle)


@router.post(
    "/reload",
    summary="Verify, load and warm up the bundles again (optionally a new default bundle), then swap atomically",
    response_model=None,
    responses={200: {"model": ReloadResponse}, **_ADMIN_ERRORS},
    openapi_extra={
        "requestBody": {"required": False, "content": {"application/json": {"schema": ReloadRequest.model_json_schema()}}}
    },
)
async def reload_bundles(request: Request, state: StateDep) -> OrjsonResponse:
    bundle = await read_reload_request(request)
    outcome = await state.reloader.reload(bundle, trigger="admin API")
    return OrjsonResponse(outcome.to_json())
