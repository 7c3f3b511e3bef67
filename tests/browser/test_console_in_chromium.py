"""The console and the docs in a real browser (Debian's headless Chromium through Selenium and chromedriver)
against `oodserve serve` on the shipped Fashion-MNIST bundle, behind an API key."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from oodserve.bench.browser import PageRequest, chromium_paths, console_problems, headless_chromium, page_requests, wait_for
from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, load_images
from tests.helpers.live_server import REPOSITORY_ROOT, ServeProcess

BUNDLE = REPOSITORY_ROOT / "models" / "bundles" / "fashion-mnist"
MNIST = REPOSITORY_ROOT.parent / "shared" / "data" / "mnist"
KEY = "console-browser-test-key"

pytestmark = [
    pytest.mark.skipif(chromium_paths() is None, reason="Debian chromium and chromium-driver not installed (make test installs them)"),
    pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.exists(), reason="Debian dataset-fashion-mnist not installed"),
    pytest.mark.slow,
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    log = tmp_path_factory.mktemp("console-server") / "serve.log"
    process = ServeProcess(BUNDLE, log, env={"OODSERVE_API_KEYS": KEY})
    try:
        process.wait_ready(timeout=120)
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with headless_chromium() as driver:
        yield driver


def fused_p_values(server: ServeProcess, images: np.ndarray) -> np.ndarray:
    response = httpx.post(f"{server.url}/v1/score", json={"instances": images.tolist()}, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=60)
    assert response.status_code == 200, response.text
    return np.array([result["p_value"] for result in response.json()["results"]])


def write_png(image: np.ndarray, path: Path) -> str:
    Image.fromarray(image.reshape(28, 28).astype(np.uint8)).save(path)
    return str(path)


def same_origin(request: PageRequest, base: str) -> bool:
    return request.url.startswith((base + "/", "blob:" + base + "/", "data:"))


def slider_position(alpha: float, minimum_alpha: float, steps: int = 1000, top: float = 0.5) -> int:
    """The console's log-scale slider position for `alpha` (console.js alphaToSlider)."""
    low, high = math.log10(minimum_alpha * 1.0001), math.log10(top)
    return round((math.log10(alpha) - low) / (high - low) * steps)


def upload_and_wait(browser: Any, path: str, previous: str | None) -> tuple[str, str]:
    """Pick `path` in the file field; wait for a new first result; return its (verdict, p-value text)."""
    from selenium.webdriver.common.by import By

    browser.find_element(By.ID, "file-input").send_keys(path)

    def new_result(d: Any) -> tuple[str, str] | None:
        cards = d.find_elements(By.CSS_SELECTOR, "#results .result")
        if not cards or cards[0].get_attribute("data-p-value") == previous:
            return None
        return cards[0].get_attribute("data-verdict"), cards[0].get_attribute("data-p-value")

    return wait_for(browser, new_result)


def test_console_shows_models_verdicts_evidence_samples_and_traffic(server: ServeProcess, browser: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    fashion = load_images(DEFAULT_FASHION_MNIST_DIR, "test").images[:60]
    fashion_p = fused_p_values(server, fashion)
    browser.get(server.url + "/")
    # Without the key the API's own words are shown, then the key field unlocks the page.
    error = wait_for(browser, lambda d: (box := d.find_element(By.ID, "error")).is_displayed() and box)
    assert error.text.startswith("401 unauthorized") and "Bearer" in error.text
    key_field = browser.find_element(By.ID, "api-key")
    key_field.send_keys(KEY, Keys.TAB)
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#model-select option[value='fashion-mnist']"))
    wait_for(browser, lambda d: not d.find_element(By.ID, "error").is_displayed())
    facts = browser.find_element(By.ID, "model-facts").text
    assert "input_complexity" in facts and "smallest supported" in facts and "CPUExecutionProvider" in facts

    # A Fashion-MNIST image well inside: in-distribution, with a bar and a histogram per signal.
    inside = int(np.argmax(fashion_p))
    verdict, shown = upload_and_wait(browser, write_png(fashion[inside], tmp_path / "fashion.png"), None)
    assert verdict == "in_distribution" and float(shown) == pytest.approx(fashion_p[inside], rel=1e-6)
    signals = browser.find_elements(By.CSS_SELECTOR, "#results .result .signal")
    assert len(signals) == 11 and all(s.find_element(By.CSS_SELECTOR, "canvas.histogram") for s in signals)
    drawn = browser.execute_script(
        "const c = document.querySelector('#results canvas.histogram');"
        "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n;")
    assert drawn > 200  # the histogram and its marker were painted

    # An MNIST digit: OOD.
    if MNIST.exists():
        digits = load_images(MNIST, "test").images[:20]
        outside = int(np.argmin(fused_p_values(server, digits)))
        verdict, shown = upload_and_wait(browser, write_png(digits[outside], tmp_path / "digit.png"), shown)
        assert verdict == "ood"

    # The alpha slider moves the verdict of an input near the threshold: is_ood = p_value < alpha redrawn from the
    # p-values the API returned, without another request (which would feed the drift stream the same inputs again).
    near = int(np.argmin(np.where((fashion_p > 0.07) & (fashion_p < 0.3), fashion_p, np.inf)))
    p = float(fashion_p[near])
    verdict, shown = upload_and_wait(browser, write_png(fashion[near], tmp_path / "near.png"), shown)
    assert verdict == "in_distribution"
    minimum = float(httpx.get(f"{server.url}/v1/models/fashion-mnist", headers={"Authorization": f"Bearer {KEY}"}).json()["minimum_alpha"])
    slider = browser.find_element(By.ID, "alpha")
    for alpha, verdict in ((p * 1.25, "ood"), (p / 1.25, "in_distribution")):
        browser.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'));",
                               slider, slider_position(alpha, minimum))
        wait_for(browser, lambda d, v=verdict: d.find_element(By.CSS_SELECTOR, "#results .result").get_attribute("data-verdict") == v)

    # Samples from the flow, and the live stream view (refreshed every few seconds).
    browser.find_element(By.ID, "samples-button").click()
    wait_for(browser, lambda d: d.execute_script("const i = document.querySelector('#samples img'); return i && i.naturalWidth > 0;"))
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#drift tr[data-stream='console']"), timeout=15)
    assert "% of the last" in browser.find_element(By.ID, "traffic-facts").text

    requests = page_requests(browser)
    assert requests and all(same_origin(r, server.url) for r in requests), [r.url for r in requests if not same_origin(r, server.url)]
    assert [r for r in requests if r.failure] == []
    scored = [r for r in requests if r.method == "POST" and r.url.endswith("/score?alpha=0.05")]
    assert len(scored) == (3 if MNIST.exists() else 2)  # one per upload: the slider sent none
    refused = [r for r in requests if r.status is not None and r.status >= 400]
    assert refused and all(r.status == 401 for r in refused)  # only the calls made before the key was typed
    problems = [m for m in console_problems(browser) if "status of 401" not in m]
    assert problems == []


def test_docs_render_every_operation_offline(server: ServeProcess, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    schema = httpx.get(f"{server.url}/openapi.json").json()
    operations = sum(len([m for m in item if m in ("get", "post", "put", "delete", "patch")]) for item in schema["paths"].values())
    page_requests(browser), console_problems(browser)  # drain what the console test left
    browser.get(server.url + "/docs")
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) >= operations, timeout=30)
    assert browser.find_elements(By.CSS_SELECTOR, "button.authorize")  # the bearer schemes can be used from the page
    requests = page_requests(browser)
    assert all(same_origin(r, server.url) for r in requests), [r.url for r in requests if not same_origin(r, server.url)]
    assert [r for r in requests if r.failure or (r.status or 0) >= 400] == []
    assert console_problems(browser) == []
