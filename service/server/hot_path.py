"""The lean route for the scoring endpoints: a pure ASGI layer that answers POST score and infer requests
without FastAPI's routing and dependency solving, with the very handlers, checks and errors the routers use.

FastAPI resolves a request by matching it against every route and then solving its dependency graph
(state, registry, engine, API key): per request that costs more than scoring one image does. The hot
endpoints need none of that machinery: their path is a fixed pattern, their dependencies are three plain
calls. This layer sits inside the request-limits and request-metrics middleware (body limit, timeout and
request metrics apply unchanged) and in front of FastAPI; every other request, and every method other
than POST on these paths, goes on to FastAPI as before. The routes stay declared in the routers, so the
OpenAPI schema and the fallback (OODSERVE_LEAN_ROUTES=false) are the routers' own.

Hot paths: POST /v1/score, /v1/models/{name}/score, /v2/models/{name}/infer and
/v2/models/{name}/versions/{version}/infer.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from oodserve.engine import Engine
from oodserve.server.errors import DOMAIN_ERRORS, ApiError, as_api_error, envelope_of_route
from oodserve.server.middleware.limits import ASGIApp, Receive, Scope, Send
from oodserve.server.security import authorize
from oodserve.server.state import AppState

Handler = Callable[[Request, Engine], Awaitable[Response]]
DOMAIN_ERROR_TYPES: tuple[type[Exception], ...] = (ApiError, *DOMAIN_ERRORS)
"""What a route answers as an error itself; every other exception propagates (as from a FastAPI route)."""


@dataclass(frozen=True)
class HotRoute:
    """One lean route: the path pattern, the router's route it stands for, and its handler."""

    pattern: re.Pattern[str]
    route: APIRoute
    handler: Handler
    default_model: bool
    """True for /v1/score (the default model, no name in the path)."""
    versioned: bool
    """True for v2 routes: the engine must match a version from the path or, without one there, ?version=."""


def _path_pattern(template: str) -> re.Pattern[str]:
    """`/v2/models/{name}/infer` -> a regex with one named group per path parameter (one path segment each)."""
    return re.compile("^" + re.sub(r"\\{(\w+)\\}", r"(?P<\1>[^/]+)", re.escape(template)) + "$")


def hot_routes(routes: Sequence[BaseRoute], handlers: Mapping[str, Handler]) -> list[HotRoute]:
    """The lean routes for `handlers` (route path template -> handler), each bound to the router's POST route
    of that template (its error envelope and its label in the request metrics); a template no router serves
    is an error."""
    by_path = {route.path: route for route in routes if isinstance(route, APIRoute) and "POST" in (route.methods or ())}
    missing = sorted(set(handlers) - set(by_path))
    if missing:
        raise ValueError(f"no POST route for lean paths {missing}")
    return [
        HotRoute(_path_pattern(path), by_path[path], handler, default_model="{name}" not in path, versioned=path.startswith("/v2/"))
        for path, handler in handlers.items()
    ]


def route_path(scope: Scope) -> str:
    """The path the routers match: scope["path"] without the app's root_path (uvicorn --root-path), as Starlette does."""
    path: str = scope["path"]
    root_path: str = scope.get("root_path", "")
    if not root_path or not path.startswith(root_path) or path == root_path:
        return path
    return path[len(root_path) :] if path[len(root_path)] == "/" else path


class HotPathMiddleware:
    """Answers the lean routes itself; passes every other request to `app` (FastAPI)."""

    def __init__(self, app: ASGIApp, state: AppState, routes: Sequence[HotRoute]) -> None:
        self.app = app
        self.state = state
        self.routes = tuple(routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = route_path(scope)
            for hot in self.routes:
                match = hot.pattern.match(path)
                if match is not None:
                    await self._answer(hot, match.groupdict(), scope, receive, send)
                    return
        await self.app(scope, receive, send)

    async def _answer(self, hot: HotRoute, path_params: dict[str, Any], scope: Scope, receive: Receive, send: Send) -> None:
        scope["route"] = hot.route  # request metrics label it by template; errors take its envelope
        scope["path_params"] = path_params
        request = Request(scope, receive)
        try:
            response = await self._handle(hot, path_params, request)
        except DOMAIN_ERROR_TYPES as error:
            api_error = as_api_error(error)
            envelope = envelope_of_route(hot.route)
            response = envelope.response(api_error.status_code, api_error.code, api_error.message, api_error.headers or None)
        # Anything else propagates as it does from a FastAPI route: the limits middleware answers a body past the
        # limit (413), and the app's crash handler a bug (a logged 500 in this route's envelope).
        await response(scope, receive, send)

    async def _handle(self, hot: HotRoute, path_params: dict[str, Any], request: Request) -> Response:
        """The data plane's key check and model lookup (as the routers' dependencies do), then the route's handler."""
        await authorize(request, "api")
        if hot.default_model:
            engine = self.state.plane.model(None)
        else:  # the v2 route without {version} takes ?version= as FastAPI's dependency does
            version = path_params.get("version", request.query_params.get("version") if hot.versioned else None)
            engine = self.state.plane.model(path_params["name"], version)
        return await hot.handler(request, engine)
