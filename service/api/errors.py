"""Error responses {"error": {"code", "message"}} for every failure, client mistakes always 4xx."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.api.responses import OrjsonResponse

logger = logging.getLogger("oodserve.api")


class ApiError(Exception):
    """A request that cannot be served: HTTP status, a machine-readable code and a message saying why."""

    def __init__(self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = dict(headers or {})  # e.g. WWW-Authenticate on 401, Retry-After on 503


def error_response(status_code: int, code: str, message: str) -> OrjsonResponse:
    """The JSON error body every endpoint uses."""
    return OrjsonResponse({"error": {"code": code, "message": message}}, status_code=status_code)


_STATUS_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "not_ready",
}


def install_error_handlers(app: FastAPI) -> None:
    """Route ApiError, FastAPI validation errors, Starlette HTTP errors and crashes to JSON errors."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> OrjsonResponse:
        response = error_response(error.status_code, error.code, error.message)
        response.headers.update(error.headers)
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> OrjsonResponse:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in issue.get('loc', ()))}: {issue.get('msg', '')}" for issue in error.errors()
        )
        return error_response(422, "invalid_request", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> OrjsonResponse:
        code = _STATUS_CODES.get(error.status_code, "http_error")
        message = str(error.detail)
        if error.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        if error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        response = error_response(error.status_code, code, message)
        for key, value in (error.headers or {}).items():
            response.headers[key] = value
        return response

    @app.exception_handler(Exception)
    async def _crash(request: Request, error: Exception) -> OrjsonResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, "internal_error", "the server failed to handle this request; see the service log")
