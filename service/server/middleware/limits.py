"""Request limits enforced below the routers: body bytes (413 before the body is read), a per-request timeout (504)
and the JSON nesting depth, so no client can make the service read, parse or wait without bound."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

import numpy as np
from starlette.routing import BaseRoute

from oodserve.server.errors import ApiError, ErrorEnvelope, envelope_for_scope
from oodserve.server.schemas import ErrorResponse

logger = logging.getLogger("oodserve.limits")

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

LIMIT_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed request (e.g. a Content-Length that is not a number)."},
    413: {"model": ErrorResponse, "description": "Body larger than OODSERVE_MAX_BODY_BYTES (checked before and while reading)."},
    504: {"model": ErrorResponse, "description": "Not answered within OODSERVE_REQUEST_TIMEOUT_SECONDS."},
}

CLOSE = {"connection": "close"}  # the unread rest of the body must not be parsed as the next request

_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)  # a string literal, escapes included
_NOT_BRACKETS = bytes(byte for byte in range(256) if byte not in b"[]{}")
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 / -1 as int8


def json_nesting_depth(body: bytes) -> int:
    """Deepest array/object nesting of a JSON text, counted on the bytes before parsing (no recursion).

    String literals are cut out first (so brackets inside strings do not count), every byte that is not
    a bracket is dropped (bytes.translate, C speed), and the depth is the largest running sum of +1 per
    opening and -1 per closing bracket. Exact for valid JSON; for invalid JSON a number the parser
    refuses anyway.
    """
    if b'"' in body:
        body = _JSON_STRING.sub(b"", body)
    brackets = body.translate(_BRACKET_STEPS, _NOT_BRACKETS)
    if not brackets:
        return 0
    depth = np.cumsum(np.frombuffer(brackets, dtype=np.int8), dtype=np.int64)
    return max(int(depth.max()), 0)


def check_json_depth(body: bytes, max_depth: int) -> None:
    """400 `malformed_json` when the body nests arrays/objects deeper than max_depth."""
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return  # not enough brackets to nest deeper (the common small request: no scan needed)
    depth = json_nesting_depth(body)
    if depth > max_depth:
        raise ApiError(400, "malformed_json", f"JSON nesting depth is {depth}; the limit is {max_depth} (OODSERVE_MAX_JSON_DEPTH)")


class BodyTooLarge(Exception):
    """Raised from `receive` once the streamed body passes the limit (the middleware answers 413)."""


async def send_error(
    send: Send, envelope: ErrorEnvelope, status_code: int, code: str, message: str, headers: dict[str, str] | None = None
) -> None:
    """Send a complete JSON error response, worded in `envelope`, on a raw ASGI channel."""
    body = envelope.body(code, message)
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(key.lower().encode(), value.encode()) for key, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": envelope.status(status_code), "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class RequestLimitsMiddleware:
    """Pure ASGI middleware for every HTTP request.

    - Content-Length above max_body_bytes: 413 at once, the app is not called and no body byte is read.
    - Bodies without Content-Length (chunked) or lying about it: bytes are counted as they arrive and
      the request is answered 413 as soon as the count passes the limit (whatever the app then tries to
      send is replaced); the rest of the body is never read.
    - A request not answered within timeout_seconds gets 504 (the app task is cancelled; work already
      running in a worker thread finishes there and its result is dropped). Paths under
      `timeout_exempt_prefixes` (admin reloads) have no timeout.

    Errors are worded in the envelope of the route the request is for (`routes`, resolved only when
    an error is sent).
    """

    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        timeout_seconds: float | None,
        routes: Sequence[BaseRoute] = (),
        timeout_exempt_prefixes: tuple[str, ...] = ("/v1/admin/",),
    ) -> None:
        self.app = app
        self.routes = routes
        self.max_body_bytes = max_body_bytes
        self.timeout_seconds = timeout_seconds
        self.timeout_exempt_prefixes = timeout_exempt_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        declared = _declared_length(scope)
        if declared == -1:
            await send_error(send, self._envelope(scope), 400, "bad_request", "Content-Length must be a non-negative integer", CLOSE)
            return
        if declared is not None and declared > self.max_body_bytes:
            await send_error(
                send,
                self._envelope(scope),
                413,
                "body_too_large",
                f"request body is {declared} bytes; the limit is {self.max_body_bytes} bytes",
                CLOSE,
            )
            return
        state = _Exchange(scope)
        limit = self.max_body_bytes

        async def counting_receive() -> Message:
            message = await receive()
            if message["type"] == "http.request":
                state.received += len(message.get("body", b""))
                if state.received > limit:
                    state.too_large = True
                    raise BodyTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        async def guarded_send(message: Message) -> None:
            if state.answered_by_middleware:
                return  # we already answered (413 or 504): drop what the app sends later
            if state.too_large and message["type"] == "http.response.start" and not state.started:
                await self._answer(send, state, 413, "body_too_large", f"request body exceeds the limit of {limit} bytes")
                return
            if message["type"] == "http.response.start":
                state.started = True
            await send(message)

        timeout = None if path.startswith(self.timeout_exempt_prefixes) else self.timeout_seconds
        try:
            if timeout is None:
                await self.app(scope, counting_receive, guarded_send)
            else:
                await self._run_with_timeout(scope, counting_receive, guarded_send, send, state, timeout)
        except BodyTooLarge:
            if not state.started and not state.answered_by_middleware:
                await self._answer(send, state, 413, "body_too_large", f"request body exceeds the limit of {limit} bytes")

    async def _run_with_timeout(
        self, scope: Scope, receive: Receive, guarded_send: Send, send: Send, state: _Exchange, timeout: float
    ) -> None:
        """Run the app with a timer (no extra task per request): when it fires, a 504 is sent at once from a
        short task of its own and the request's task is cancelled. Work shielded from cancellation (a worker
        thread) finishes in the background and whatever the app sends afterwards is dropped."""
        loop = asyncio.get_running_loop()
        request_task = asyncio.current_task()
        answer: list[asyncio.Task[None]] = []

        def on_timeout() -> None:
            state.timed_out = True
            if not state.started and not state.answered_by_middleware:
                logger.warning("%s %s timed out after %.1f s: answered 504", scope.get("method"), scope.get("path"), timeout)
                state.answered_by_middleware = state.started = True  # from now on the app's sends are dropped
                message = f"the request was not answered within {timeout:g} s"
                answer.append(loop.create_task(send_error(send, self._envelope(scope), 504, "timeout", message, CLOSE)))
            else:
                logger.warning(
                    "%s %s passed the %.1f s timeout after its response had started", scope.get("method"), scope.get("path"), timeout
                )
            if request_task is not None:
                request_task.cancel()

        timer = loop.call_later(timeout, on_timeout)
        try:
            await self.app(scope, receive, guarded_send)
        except asyncio.CancelledError:
            if not state.timed_out or request_task is None:
                raise  # cancelled by someone else (e.g. the server shutting down)
            request_task.uncancel()
        finally:
            timer.cancel()
        for task in answer:
            await task

    def _envelope(self, scope: Scope) -> ErrorEnvelope:
        return envelope_for_scope(self.routes, scope)

    async def _answer(self, send: Send, state: _Exchange, status_code: int, code: str, message: str) -> None:
        state.answered_by_middleware = True
        state.started = True
        await send_error(send, self._envelope(state.scope), status_code, code, message, CLOSE)


class _Exchange:
    """Mutable per-request state shared by the wrapped receive/send."""

    __slots__ = ("scope", "received", "too_large", "started", "answered_by_middleware", "timed_out")

    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.timed_out = False
        self.received = 0
        self.too_large = False
        self.started = False
        self.answered_by_middleware = False


def _declared_length(scope: Scope) -> int | None:
    """Content-Length as an int; None when absent; -1 when not a non-negative integer."""
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            text = value.decode("latin-1").strip()
            return int(text) if text.isdigit() else -1
    return None
