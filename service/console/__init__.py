"""The browser console at `/` and the offline API docs at `/docs`: static files shipped in this package
(plain HTML, CSS and JavaScript, no build step) and Swagger UI's distribution from the `fastapi-offline`
package, so no page the service serves loads anything from another origin."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

STATIC_DIRECTORY = Path(__file__).parent / "static"


@dataclass(frozen=True)
class Asset:
    """One file the service serves to browsers."""

    path: Path
    media_type: str
    vendored: bool
    """From another package (cache for an hour) rather than this one (revalidate each load)."""


def _swagger_directory() -> Path:
    return Path(str(files("fastapi_offline") / "static"))


def console_assets() -> dict[str, Asset]:
    """The console's files by URL name (`/console/NAME`)."""
    return {
        "console.js": Asset(STATIC_DIRECTORY / "console.js", "text/javascript; charset=utf-8", False),
        "console.css": Asset(STATIC_DIRECTORY / "console.css", "text/css; charset=utf-8", False),
        "favicon.svg": Asset(STATIC_DIRECTORY / "favicon.svg", "image/svg+xml", False),
    }


def docs_assets() -> dict[str, Asset]:
    """The API docs' files by URL name (`/docs/assets/NAME`): Swagger UI's bundle and styles, and our start-up script."""
    swagger = _swagger_directory()
    return {
        "swagger-ui-bundle.js": Asset(swagger / "swagger-ui-bundle.js", "text/javascript; charset=utf-8", True),
        "swagger-ui.css": Asset(swagger / "swagger-ui.css", "text/css; charset=utf-8", True),
        "docs.js": Asset(STATIC_DIRECTORY / "docs.js", "text/javascript; charset=utf-8", False),
        "favicon.svg": Asset(STATIC_DIRECTORY / "favicon.svg", "image/svg+xml", False),
    }


CONSOLE_PAGE = STATIC_DIRECTORY / "index.html"
DOCS_PAGE = STATIC_DIRECTORY / "docs.html"
