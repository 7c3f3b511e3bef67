"""API keys: `Authorization: Bearer KEY` checked in constant time, as FastAPI dependencies (Annotated aliases).

Three scopes, each a dependency:
- scoring (`OODSERVE_API_KEYS`): open when no key is configured, else 401 without a key and 403 with a wrong one;
- admin (`OODSERVE_ADMIN_KEYS`): *disabled* (403 `admin_disabled`) when no admin key is configured, never open;
- metrics: open unless `OODSERVE_PROTECT_METRICS=true`, then any scoring or admin key.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import SecretStr

from oodserve.config import Settings
from oodserve.server.errors import ApiError
from oodserve.server.schemas import ErrorResponse
from oodserve.server.state import app_state

BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="oodserve"'}

# auto_error=False: a missing or non-Bearer header reaches our checks (JSON 401), yet OpenAPI documents the scheme.
bearer_scheme = HTTPBearer(auto_error=False, description="`Authorization: Bearer KEY` with a key from OODSERVE_API_KEYS.")
admin_bearer_scheme = HTTPBearer(
    auto_error=False, scheme_name="AdminBearer", description="`Authorization: Bearer KEY` with a key from OODSERVE_ADMIN_KEYS."
)


def _digest(text: str) -> bytes:
    """sha256 of the key, so compare_digest always sees equal lengths (the key length does not leak either)."""
    return hashlib.sha256(text.encode("utf-8")).digest()


def key_matches(presented: str, configured: Iterable[SecretStr]) -> bool:
    """True when `presented` equals one of the configured keys; every key is compared (no early exit),
    each with hmac.compare_digest, so the time taken does not depend on where the keys differ."""
    presented_digest = _digest(presented)
    matched = False
    for key in configured:
        matched |= hmac.compare_digest(presented_digest, _digest(key.get_secret_value()))
    return matched


def _presented_key(credentials: HTTPAuthorizationCredentials | None, scope: str) -> str:
    """The bearer token, or 401 with a WWW-Authenticate challenge when the header is missing or not Bearer."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise ApiError(
            401,
            "unauthorized",
            f"this endpoint needs an {scope} key: send `Authorization: Bearer KEY`",
            headers=BEARER_CHALLENGE,
        )
    return credentials.credentials


def check_key(credentials: HTTPAuthorizationCredentials | None, configured: list[SecretStr], scope: str) -> None:
    """401 without a bearer key, 403 when it is not one of `configured`."""
    presented = _presented_key(credentials, scope)
    if not key_matches(presented, configured):
        raise ApiError(403, "forbidden", f"the presented key is not a valid {scope} key")


def _settings(request: Request) -> Settings:
    return app_state(request).settings


async def require_scoring_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> None:
    """Scoring and model endpoints: open without OODSERVE_API_KEYS, else a valid scoring key."""
    settings = _settings(request)
    if settings.api_keys:
        check_key(credentials, settings.api_keys, "API")


async def require_admin_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(admin_bearer_scheme)]
) -> None:
    """Admin endpoints: disabled (403) without OODSERVE_ADMIN_KEYS, else a valid admin key."""
    settings = _settings(request)
    if not settings.admin_keys:
        raise ApiError(403, "admin_disabled", "admin endpoints are disabled: no OODSERVE_ADMIN_KEYS are configured")
    check_key(credentials, settings.admin_keys, "admin")


async def require_metrics_key(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)]
) -> None:
    """/metrics: open unless OODSERVE_PROTECT_METRICS, then a scoring or admin key."""
    settings = _settings(request)
    if settings.protect_metrics:
        check_key(credentials, [*settings.api_keys, *settings.admin_keys], "API or admin")


RequireScoringKey = Annotated[None, Depends(require_scoring_key)]
RequireAdminKey = Annotated[None, Depends(require_admin_key)]
RequireMetricsKey = Annotated[None, Depends(require_metrics_key)]

# For router-level use: app.include_router(router, dependencies=SCORING_KEY_DEPENDENCIES).
SCORING_KEY_DEPENDENCIES = [Depends(require_scoring_key)]
ADMIN_KEY_DEPENDENCIES = [Depends(require_admin_key)]
METRICS_KEY_DEPENDENCIES = [Depends(require_metrics_key)]

AUTH_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "No key sent while keys are configured (`Authorization: Bearer KEY`)."},
    403: {"model": ErrorResponse, "description": "The key is not valid for this endpoint."},
}
