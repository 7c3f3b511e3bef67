"""Every failure as an HTTP error, mapped once: domain exceptions -> (status, code) in `DOMAIN_ERRORS`,
and the error body (envelope) chosen by the router that served the request.

- v1 and every non-v2 route: `{"error": {"code", "message"}}`;
- v2 (Open Inference Protocol): `{"error": message}`, and 400 where v1 answers 422.

A router's envelope is a property of its route class (`V1Route`, `V2Route`); middleware that answers
before routing (request limits) resolves the route the request would take with `envelope_for_scope`.
Client mistakes are always 4xx; a 500 is a bug and is logged with its traceback.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import BaseRoute, Match

from oodserve.dataplane import InvalidStreamError, PermissionDenied, Unauthenticated
from oodserve.engine import NotReadyError, UnknownModelError
from oodserve.runtime.batching import DeadlineExceededError, QueueFullError
from oodserve.scoring.inputs import InputError, MalformedInputError, UnsupportedInputError
from oodserve.server.reload import BundleRefusedError, ReloadFailedError, ReloadInProgressError

logger = logging.getLogger("oodserve.server")


class ApiError(Exception):
    """A request the edge refuses by itself: HTTP status, a machine-readable code and a message saying why."""

    def __init__(self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.code = code
        self.message = message
        self.headers = dict(headers or {})  # e.g. WWW-Authenticate on 401, Retry-After on 503


@dataclass(frozen=True)
class ErrorEnvelope:
    """How a family of routes words its errors: the JSON body and the statuses it renames."""

    name: str
    nested: bool
    """True: {"error": {"code", "message"}}; False: {"error": message}."""
    renamed_statuses: tuple[tuple[int, int], ...] = ()

    def status(self, status_code: int) -> int:
        return dict(self.renamed_statuses).get(status_code, status_code)

    def body(self, code: str, message: str) -> bytes:
        return orjson.dumps({"error": {"code": code, "message": message}} if self.nested else {"error": message})

    def response(self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
        return Response(self.body(code, message), status_code=self.status(status_code), media_type="application/json", headers=headers)


V1_ENVELOPE = ErrorEnvelope("v1", nested=True)
V2_ENVELOPE = ErrorEnvelope("v2", nested=False, renamed_statuses=((422, 400),))


class V1Route(APIRoute):
    """Routes answering errors as {"error": {"code", "message"}} (the default of every router)."""

    error_envelope = V1_ENVELOPE


class V2Route(APIRoute):
    """Open Inference Protocol v2 routes: errors {"error": message}, 422 answered as 400."""

    error_envelope = V2_ENVELOPE


def envelope_of_route(route: BaseRoute | None) -> ErrorEnvelope:
    return getattr(route, "error_envelope", V1_ENVELOPE)


def envelope_for_scope(routes: Iterable[BaseRoute], scope: MutableMapping[str, Any]) -> ErrorEnvelope:
    """The envelope of the route a request matches (fully or by path only), before routing has run."""
    if "route" in scope:
        return envelope_of_route(scope["route"])
    for route in routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            return envelope_of_route(route)
    return V1_ENVELOPE


def error_response(status_code: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    """A v1 JSON error response (for routes that answer an error without raising)."""
    return V1_ENVELOPE.response(status_code, code, message, headers)


def _input_error(error: InputError) -> ApiError:
    return ApiError(413 if error.code == "too_many_instances" else 422, error.code, error.message)


def _queue_full(error: QueueFullError) -> ApiError:
    return ApiError(503, "overloaded", str(error), headers={"Retry-After": str(error.retry_after_s)})


def _fixed(status_code: int, code: str) -> Callable[[Exception], ApiError]:
    return lambda error: ApiError(status_code, code, str(error))


def _unknown_model(error: UnknownModelError) -> ApiError:
    return ApiError(404, error.code, str(error))


BEARER_CHALLENGE = {"WWW-Authenticate": 'Bearer realm="oodserve"'}


def _unauthenticated(error: Unauthenticated) -> ApiError:
    return ApiError(401, "unauthorized", str(error), headers=BEARER_CHALLENGE)


def _permission_denied(error: PermissionDenied) -> ApiError:
    return ApiError(403, error.code, str(error))


DOMAIN_ERRORS: dict[type[Exception], Callable[[Any], ApiError]] = {
    MalformedInputError: lambda error: ApiError(400, error.code, error.message),
    UnsupportedInputError: lambda error: ApiError(415, error.code, error.message),
    InputError: _input_error,
    QueueFullError: _queue_full,
    DeadlineExceededError: _fixed(504, "deadline_exceeded"),
    NotReadyError: _fixed(503, "not_ready"),
    UnknownModelError: _unknown_model,
    Unauthenticated: _unauthenticated,
    PermissionDenied: _permission_denied,
    InvalidStreamError: _fixed(422, "invalid_stream"),
    ReloadInProgressError: _fixed(409, "reload_in_progress"),
    BundleRefusedError: _fixed(422, "bundle_refused"),
    ReloadFailedError: _fixed(500, "reload_failed"),
}
"""Each domain exception -> the HTTP error it is answered with (status, code, message, headers)."""


def as_api_error(error: Exception) -> ApiError:
    """The HTTP form of a domain exception (its class or nearest base in DOMAIN_ERRORS)."""
    if isinstance(error, ApiError):
        return error
    for cls in type(error).__mro__:
        if cls in DOMAIN_ERRORS:
            return DOMAIN_ERRORS[cls](error)
    raise TypeError(f"{type(error).__name__} is not a domain error")


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


def validation_problems(error: RequestValidationError) -> str:
    """FastAPI's validation errors as one line: `loc: message; ...`."""
    return "; ".join(f"{'.'.join(str(part) for part in issue.get('loc', ()))}: {issue.get('msg', '')}" for issue in error.errors())


def install_error_handlers(app: FastAPI) -> None:
    """Route ApiError, every domain error, validation errors, Starlette HTTP errors and crashes to JSON errors
    in the envelope of the route that served the request."""

    def answer(request: Request, error: ApiError) -> Response:
        envelope = envelope_of_route(request.scope.get("route"))
        return envelope.response(error.status_code, error.code, error.message, error.headers or None)

    async def _api_error(request: Request, error: Exception) -> Response:
        return answer(request, as_api_error(error))

    error_classes: list[type[Exception]] = [ApiError, *DOMAIN_ERRORS]
    for error_class in error_classes:
        app.add_exception_handler(error_class, _api_error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError) -> Response:
        return answer(request, ApiError(422, "invalid_request", validation_problems(error) or "invalid request"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> Response:
        code = _STATUS_CODES.get(error.status_code, "http_error")
        message = str(error.detail)
        if error.status_code == 404 and message == "Not Found":
            message = f"no route {request.method} {request.url.path}; see /docs for the API"
        if error.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        return answer(request, ApiError(error.status_code, code, message, dict(error.headers or {})))

    @app.exception_handler(Exception)
    async def _crash(request: Request, error: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return answer(request, ApiError(500, "internal_error", "the server failed to handle this request; see the service log"))
