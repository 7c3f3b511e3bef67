"""Debian's headless Chromium driven through Selenium and Debian's chromedriver (no browser download): the
browser tests of the console and docs, and the console screenshots and page-load figures, use it.

The driver records Chrome's network events (performance log) so a caller can list every request a page made,
its status, size and whether it failed, and the console messages (CSP violations and failed loads show there).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMEDRIVER_CANDIDATES = ("/usr/bin/chromedriver",)


def chromium_paths() -> tuple[str, str] | None:
    """(browser, driver) paths of the installed Chromium and chromedriver, or None when either is missing."""
    browser = next((p for p in CHROMIUM_CANDIDATES if Path(p).exists()), shutil.which("chromium"))
    driver = next((p for p in CHROMEDRIVER_CANDIDATES if Path(p).exists()), shutil.which("chromedriver"))
    return (browser, driver) if browser and driver else None


@contextmanager
def headless_chromium(width: int = 1280, height: int = 1400) -> Iterator[Any]:
    """A Selenium Chrome driver on headless Chromium with network and console logging; quit on exit."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    paths = chromium_paths()
    if paths is None:
        raise RuntimeError("Chromium and chromedriver are not installed (Debian: apt-get install chromium chromium-driver)")
    browser, driver_path = paths
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--window-size={width},{height}",
                     "--no-first-run", "--disable-extensions", "--disable-background-networking", "--disable-component-update"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        yield driver
    finally:
        driver.quit()


@dataclass
class PageRequest:
    """One request a page made, from Chrome's network events."""

    url: str
    method: str
    status: int | None = None
    encoded_bytes: int | None = None
    failure: str | None = None
    started: float | None = None
    finished: float | None = None

    @property
    def milliseconds(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return (self.finished - self.started) * 1000.0


def page_requests(driver: Any) -> list[PageRequest]:
    """Every request since the last call (the performance log is drained), in the order they started."""
    requests: dict[str, PageRequest] = {}
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        method, params = message["method"], message.get("params", {})
        request_id = params.get("requestId")
        if method == "Network.requestWillBeSent":
            requests[request_id] = PageRequest(params["request"]["url"], params["request"]["method"], started=params.get("timestamp"))
        elif request_id in requests:
            request = requests[request_id]
            if method == "Network.responseReceived":
                request.status = int(params["response"]["status"])
            elif method == "Network.loadingFinished":
                request.encoded_bytes = int(params.get("encodedDataLength", 0))
                request.finished = params.get("timestamp")
            elif method == "Network.loadingFailed":
                request.failure = params.get("errorText", "failed")
                request.finished = params.get("timestamp")
    return list(requests.values())


def console_problems(driver: Any) -> list[str]:
    """Console messages of level SEVERE or WARNING since the last call (failed loads, CSP violations, script errors)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry.get("level") in ("SEVERE", "WARNING")]


def wait_for(driver: Any, condition: Any, timeout: float = 20.0) -> Any:
    """Wait until `condition(driver)` is truthy (Selenium's WebDriverWait) and return its value; elements replaced
    while the condition looked at them (a page re-rendering) count as not yet."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05, ignored_exceptions=(StaleElementReferenceException,)).until(condition)
