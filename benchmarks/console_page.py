"""The console as a newcomer sees it: screenshots with one in- and one out-of-distribution image, of the docs,
and what loading the page costs on loopback (every request, its size and time; cold loads with the cache off).

    python -m benchmarks.console_page [--bundle models/bundles/fashion-mnist] [--out benchmarks/results/console]

Needs Debian's chromium and chromium-driver, the Fashion-MNIST test file and the MNIST test file.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image
from selenium.webdriver.common.by import By

from oodserve.bench.browser import console_problems, headless_chromium, page_requests, wait_for
from oodserve.bench.http_driver import ServerProcess
from oodserve.models.data import DEFAULT_FASHION_MNIST_DIR, load_images

REPOSITORY_ROOT = Path(__file__).resolve().parents[1]
MNIST_DIR = REPOSITORY_ROOT.parent / "shared" / "data" / "mnist"


def cold_load_milliseconds(driver: Any, url: str, loads: int) -> list[float]:
    """Time from navigation start to the console's model facts rendered, `loads` times with the cache off."""
    driver.execute_cdp_cmd("Network.enable", {})
    driver.execute_cdp_cmd("Network.setCacheDisabled", {"cacheDisabled": True})
    times = []
    for _ in range(loads):
        driver.get("about:blank")
        started = time.perf_counter()
        driver.get(url)
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#model-facts dl"))
        times.append((time.perf_counter() - started) * 1000.0)
    return times


def upload(driver: Any, image: np.ndarray, path: Path, previous: str | None) -> str:
    Image.fromarray(image.reshape(28, 28)).save(path)
    driver.find_element(By.ID, "file-input").send_keys(str(path))
    wait_for(driver, lambda d: (c := d.find_elements(By.CSS_SELECTOR, "#results .result"))
             and c[0].get_attribute("data-p-value") != previous)
    card = driver.find_element(By.CSS_SELECTOR, "#results .result")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", card)
    time.sleep(0.3)
    return str(card.get_attribute("data-p-value"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, default=REPOSITORY_ROOT / "models" / "bundles" / "fashion-mnist")
    parser.add_argument("--out", type=Path, default=REPOSITORY_ROOT / "benchmarks" / "results" / "console")
    parser.add_argument("--loads", type=int, default=10)
    arguments = parser.parse_args()
    arguments.out.mkdir(parents=True, exist_ok=True)
    fashion = load_images(DEFAULT_FASHION_MNIST_DIR, "test").images[:50]
    digits = load_images(MNIST_DIR, "test").images[:20]
    with ServerProcess(arguments.bundle, {"OODSERVE_INTRA_OP_THREADS": "1"}, None) as server, headless_chromium(1280, 1100) as driver, \
            tempfile.TemporaryDirectory() as scratch:
        def p_values(images: np.ndarray) -> np.ndarray:
            results = httpx.post(f"{server.url}/v1/score", json={"instances": images.tolist()}, timeout=60).json()["results"]
            return np.array([r["p_value"] for r in results])

        inside, outside = int(np.argmax(p_values(fashion))), int(np.argmin(p_values(digits)))
        driver.get(server.url + "/")
        page_requests(driver)
        times = cold_load_milliseconds(driver, server.url + "/", arguments.loads - 1)
        page_requests(driver)
        times += cold_load_milliseconds(driver, server.url + "/", 1)
        time.sleep(0.5)
        last_load = [r for r in page_requests(driver) if not r.url.startswith("about:")]
        shown = upload(driver, fashion[inside], Path(scratch) / "fashion-mnist-test-image.png", None)
        driver.save_screenshot(str(arguments.out / "console-in-distribution.png"))
        upload(driver, digits[outside], Path(scratch) / "mnist-digit.png", shown)
        driver.save_screenshot(str(arguments.out / "console-ood.png"))
        problems = console_problems(driver)
        driver.get(server.url + "/docs")
        wait_for(driver, lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"), timeout=30)
        driver.save_screenshot(str(arguments.out / "docs.png"))
    rows = [{"url": r.url.replace(server.url, ""), "status": r.status, "bytes": r.encoded_bytes,
             "ms": None if r.milliseconds is None else round(r.milliseconds, 1)} for r in last_load]
    report = {
        "bundle": str(arguments.bundle.name),
        "cold_loads": arguments.loads,
        "load_ms_median": round(statistics.median(times), 1),
        "load_ms_max": round(max(times), 1),
        "requests_of_one_load": rows,
        "bytes_of_one_load": sum(r["bytes"] or 0 for r in rows),
        "console_problems": problems,
    }
    (arguments.out / "page-load.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
