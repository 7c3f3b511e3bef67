"""API keys over HTTP: the bearer token of `Authorization: Bearer KEY`, handed to the data plane's one key check
(`DataPlane.authorize`), as FastAPI dependencies (Annotated aliases) so OpenAPI documents the schemes.

Three scopes, each a dependency:
- scoring (`OODSERVE_API_KEYS`): open when no key is configured, else 401 without a key and 403 with a wrong one;
- admin (`OODSERVE_ADMIN_KEYS`): *disabled* (403 `admin_disabled`) when no admin key is configured, never open;
- metrics: open unless `OODSERVE_PROTECT_METRICS=true`, then any scoring or admin key.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from oodserve.dataplane import KeyScope
from oodserve.server.schemas import ErrorResponse
from oodserve.server.state import app_state

# auto_error=False: a missing or non-Bearer header reaches the key check (JSON 401), yet OpenAPI documents the scheme.
bearer_scheme = HTTPBearer(auto_error=False, description="`Authorization: Bearer KEY` with a key from OODSERVE_API_KEYS.")
admin_bearer_scheme = HTTPBearer(
    auto_error=False, scheme_name="AdminBearer", description="`Authorization: Bearer KEY` with a key from OODSERVE_ADMIN_KEYS."
)


Bearer = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
AdminBearer = Annotated[HTTPAuthorizationCredentials | None, Depends(admin_bearer_scheme)]


def presented_token(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    """The bearer token sent, or None when the header is missing, not Bearer, or empty."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        return None
    return credentials.credentials


async def authorize(request: Request, scope: KeyScope, scheme: HTTPBearer = bearer_scheme) -> None:
    """The request's bearer token through the data plane's key check for `scope` (the lean route calls this too)."""
    app_state(request).plane.authorize(presented_token(await scheme(request)), scope)


async def require_scoring_key(request: Request, credentials: Bearer) -> None:
    """Scoring and model endpoints: open without OODSERVE_API_KEYS, else a valid scoring key."""
    app_state(request).plane.authorize(presented_token(credentials), "api")


async def require_admin_key(
    request: Request, credentials: AdminBearer
) -> None:
    """Admin endpoints: disabled (403) without OODSERVE_ADMIN_KEYS, else a valid admin key."""
    app_state(request).plane.authorize(presented_token(credentials), "admin")


async def require_metrics_key(request: Request, credentials: Bearer) -> None:
    """/metrics: open unless OODSERVE_PROTECT_METRICS, then a scoring or admin key."""
    app_state(request).plane.authorize(presented_token(credentials), "metrics")


# For router-level use: app.include_router(router, dependencies=SCORING_KEY_DEPENDENCIES).
SCORING_KEY_DEPENDENCIES = [Depends(require_scoring_key)]
ADMIN_KEY_DEPENDENCIES = [Depends(require_admin_key)]
METRICS_KEY_DEPENDENCIES = [Depends(require_metrics_key)]

AUTH_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No key sent while keys are configured (`Authorization: Bearer KEY`)."},
    403: {"model": ErrorResponse, "description": "The key is not valid for this endpoint."},
}
