"""Pages for people: the console at `/` and the API docs at `/docs`, each with a Content-Security-Policy
that lets the page load and connect to this origin only (the console keeps an API key in page memory and
sends it only to this service's API, under the same auth and limits as any client)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from oodserve.console import CONSOLE_PAGE, DOCS_PAGE, Asset, console_assets, docs_assets
from oodserve.server.errors import ApiError

CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; connect-src 'self'; "
    "font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
"""Only this origin: no inline script or style, images also from data: URIs (Swagger UI's icons) and blob: URLs
(the page's own previews of the files a person picks)."""

PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

router = APIRouter(include_in_schema=False)

_CONSOLE_ASSETS = console_assets()
_DOCS_ASSETS = docs_assets()


def _page(path: object) -> FileResponse:
    return FileResponse(str(path), media_type="text/html; charset=utf-8", headers={**PAGE_HEADERS, "Cache-Control": "no-cache"})


def _asset(assets: dict[str, Asset], name: str, where: str) -> Response:
    asset = assets.get(name)
    if asset is None:
        raise ApiError(404, "not_found", f"no {where} file {name!r}; files: {sorted(assets)}")
    cache = "public, max-age=3600" if asset.vendored else "no-cache"
    return FileResponse(str(asset.path), media_type=asset.media_type, headers={**PAGE_HEADERS, "Cache-Control": cache})


@router.get("/")
async def console_page() -> Response:
    return _page(CONSOLE_PAGE)


@router.get("/console/{name}")
async def console_file(name: str) -> Response:
    return _asset(_CONSOLE_ASSETS, name, "console")


@router.get("/docs")
async def docs_page() -> Response:
    return _page(DOCS_PAGE)


@router.get("/docs/assets/{name}")
async def docs_file(name: str) -> Response:
    return _asset(_DOCS_ASSETS, name, "docs")
