"""The console at `/`, the offline docs at `/docs` and the evidence endpoints behind the console's plots."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from oodserve.console import console_assets, docs_assets
from oodserve.scoring.histograms import calibration_histogram
from oodserve.server.app import create_app
from oodserve.server.console import CONTENT_SECURITY_POLICY
from tests.helpers.bundles import make_settings

URL = re.compile(rb"(?:https?:)?//[A-Za-z0-9.-]+\.[A-Za-z]{2,}[^\s\"'<>)]*")
XML_NAMESPACES = (b"http://www.w3.org/",)
LOADING = re.compile(rb"""(?:src|href|action)\s*=\s*["']?\s*(?:https?:)?//|url\(\s*["']?\s*(?:https?:)?//|@import\s+["']?(?:https?:)?//""",
                     re.IGNORECASE)


def external_urls(text: bytes) -> list[bytes]:
    return [url for url in URL.findall(text) if not url.startswith(XML_NAMESPACES)]


def test_pages_carry_a_same_origin_content_security_policy(client: TestClient) -> None:
    for path in ("/", "/docs"):
        response = client.get(path)
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
        policy = response.headers["content-security-policy"]
        assert policy == CONTENT_SECURITY_POLICY
        directives = dict(part.strip().split(" ", 1) for part in policy.split(";"))
        for directive in ("default-src", "script-src", "style-src", "connect-src"):
            assert directives[directive] == "'self'", directive
        assert "unsafe" not in policy and "http" not in policy
        assert response.headers["x-content-type-options"] == "nosniff"


def test_no_page_or_asset_names_another_origin(client: TestClient) -> None:
    """Our pages, styles and scripts name no external URL at all; Swagger UI's vendored bundle has URLs in strings
    (specifications, licences) but nothing it loads by markup or CSS (the browser test checks what it fetches)."""
    pages = {path: client.get(path).content for path in ("/", "/docs")}
    ours = {f"/console/{name}": client.get(f"/console/{name}") for name, asset in console_assets().items() if not asset.vendored}
    ours |= {f"/docs/assets/{name}": client.get(f"/docs/assets/{name}") for name, asset in docs_assets().items() if not asset.vendored}
    vendored = {f"/docs/assets/{name}": client.get(f"/docs/assets/{name}") for name, asset in docs_assets().items() if asset.vendored}
    for path, body in pages.items():
        assert external_urls(body) == [], path
    for path, response in {**ours, **vendored}.items():
        assert response.status_code == 200, path
    for path, response in ours.items():
        assert external_urls(response.content) == [], path
    for path, response in vendored.items():
        assert LOADING.findall(response.content) == [], path
    linked = re.findall(rb'(?:src|href)="(/[^"]+)"', b"".join(pages.values()))
    assert linked and all(client.get(link.decode()).status_code == 200 for link in linked)


def test_docs_assets_come_from_the_installed_package_and_cache(client: TestClient) -> None:
    bundle = client.get("/docs/assets/swagger-ui-bundle.js")
    assert bundle.headers["content-type"].startswith("text/javascript") and b"SwaggerUIBundle" in bundle.content[:2000]
    assert "max-age" in bundle.headers["cache-control"]
    assert client.get("/console/console.js").headers["cache-control"] == "no-cache"
    missing = client.get("/console/../../pyproject.toml")
    assert missing.status_code == 404
    unknown = client.get("/docs/assets/other.js")
    assert unknown.status_code == 404 and "other.js" in unknown.json()["error"]["message"]
    assert client.get("/redoc").status_code == 404  # dropped: one docs page, served offline
    assert client.get("/openapi.json").status_code == 200


def test_console_can_be_switched_off(bundle_dir: Path) -> None:
    with TestClient(create_app(make_settings(bundle_dir, console=False))) as client:
        assert client.get("/").status_code == 404 and client.get("/docs").status_code == 404
        assert client.get("/v1/models").status_code == 200


def test_calibration_histograms_match_the_calibration_arrays(client: TestClient, bundle_dir: Path) -> None:
    body = client.get("/v1/models/test-bundle/calibration?bins=12").json()
    with np.load(bundle_dir / "calibration.npz", allow_pickle=False) as stored:
        for name, histogram in body["signals"].items():
            scores = stored[name]
            assert histogram["size"] == scores.size and sum(histogram["counts"]) == scores.size
            assert len(histogram["edges"]) == 13 and histogram["edges"][0] == pytest.approx(scores.min())
            assert histogram["edges"][-1] == pytest.approx(scores.max())
            expected, _ = np.histogram(scores, bins=12, range=(scores.min(), scores.max()))
            assert histogram["counts"] == expected.tolist()
        assert body["fused"]["size"] == stored["__fused__"].size
    for bad in ("0", "201", "x"):
        response = client.get(f"/v1/models/test-bundle/calibration?bins={bad}")
        assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
    assert client.get("/v1/models/nope/calibration").status_code == 404


def test_histogram_of_constant_or_empty_scores_keeps_finite_increasing_edges() -> None:
    constant = calibration_histogram(np.full(5, 2.0), 4)
    assert constant.counts.sum() == 5 and np.all(np.diff(constant.edges) > 0)
    empty = calibration_histogram(np.array([np.inf, np.nan]), 4)
    assert empty.size == 0 and np.all(np.isfinite(empty.edges))
    with pytest.raises(ValueError):
        calibration_histogram(np.ones(3), 0)


def test_traffic_reports_the_recent_ood_rate(bundle_dir: Path, make_images: Callable[[int, int], np.ndarray]) -> None:
    with TestClient(create_app(make_settings(bundle_dir, ood_rate_window=4))) as client:
        empty = client.get("/v1/models/test-bundle/traffic").json()
        assert empty["instances"] == 0 and empty["ood_rate"] is None and empty["window"] == 4
        inside = make_images(3, 11)
        noise = np.random.default_rng(0).integers(0, 256, (2, 1, 28, 28))
        verdicts = []
        for batch in (inside, noise):
            results = client.post("/v1/score", json={"instances": batch.tolist()}).json()["results"]
            verdicts += [r["is_ood"] for r in results]
        traffic = client.get("/v1/models/test-bundle/traffic").json()
        assert traffic["instances"] == 4 and traffic["ood"] == sum(verdicts[-4:])
        assert traffic["ood_rate"] == pytest.approx(sum(verdicts[-4:]) / 4)


def test_models_say_whether_they_can_sample(client: TestClient) -> None:
    (model,) = client.get("/v1/models").json()["models"]
    assert isinstance(model["sampler"], bool)
