"""Helpers of the deployment tests: tool paths, free loopback ports, HTTP calls, bounded waits, process control,
starting the service and a real Prometheus built from the shipped config, and the running stack they form."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from oodserve.datasets import load_images

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DEMO_BUNDLE = REPO / "models" / "bundles" / "demo"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
STARTUP_SECONDS = 90.0


def tool(name: str) -> str:
    """Path of a Debian `prometheus` binary (promtool, prometheus); skip the test when the package is missing."""
    path = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists() else None)
    if path is None:
        pytest.skip(f"{name} not found: install the Debian package `prometheus` (make test does)")
    return path


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def http_post_json(url: str, body: Any, timeout: float = 30.0) -> Any:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def wait_until(condition: Callable[[], bool], seconds: float, what: str, process: subprocess.Popen | None = None) -> None:
    """Poll `condition` every 0.25 s for at most `seconds`; fail naming `what` (and the process's exit) otherwise."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{what}: the process exited with {process.returncode}")
        try:
            if condition():
                return
        except (OSError, ValueError, LookupError):  # not up yet, or no such series yet
            pass
        time.sleep(0.25)
    raise AssertionError(f"{what}: not reached within {seconds:.0f} s")


def stop(process: subprocess.Popen) -> None:
    """Terminate a process we started, escalating to kill after 10 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def start_service(
    bundle: Path, port: int, log_path: Path, python: str = sys.executable, cwd: Path = REPO, extra_env: dict[str, str] | None = None
) -> subprocess.Popen:
    """uvicorn serving create_app() with OODSERVE_* settings on 127.0.0.1:port, output to log_path."""
    env = {
        **os.environ,
        "OODSERVE_BUNDLE": str(bundle),
        "OODSERVE_INTRA_OP_THREADS": "1",
        "OODSERVE_INTER_OP_THREADS": "1",
        "OODSERVE_LOG_LEVEL": "warning",
        **(extra_env or {}),
    }
    command = [
        python,
        "-m",
        "uvicorn",
        "--factory",
        "oodserve.server.app:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    return subprocess.Popen(command, cwd=cwd, env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT)


def prometheus_config_for(target: str, rules_file: Path) -> dict[str, Any]:
    """The shipped deploy/prometheus/prometheus.yml with the target replaced and 1 s scrape and rule intervals."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    config["rule_files"] = [str(rules_file)]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "oodserve"]
    assert job.pop("dns_sd_configs")[0]["port"] == 8000  # compose discovers replicas by DNS; here one loopback target
    job["static_configs"] = [{"targets": [target]}]
    return config


def prometheus_query(base_url: str, expr: str) -> dict[str, Any]:
    """The JSON answer of /api/v1/query (instant query now); raises on an HTTP error other than 400/422."""
    status, body = http_get(f"{base_url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}")
    answer = json.loads(body)
    if status not in (200, 400, 422):
        raise AssertionError(f"query {expr!r}: HTTP {status}: {answer}")
    return answer


def scoring_images() -> np.ndarray:
    """6 Fashion-MNIST test images (in-distribution for the demo bundle) and 4 noise images (OOD), uint8 (10, 1, 28, 28)."""
    if (FASHION_MNIST / "t10k-images-idx3-ubyte.gz").exists():

        in_distribution = load_images(FASHION_MNIST, "t10k").images[:6]
    else:
        in_distribution = np.full((6, 28, 28), 0, dtype=np.uint8)
    noise = np.random.default_rng(0).integers(0, 256, (4, 28, 28), dtype=np.uint8)
    return np.concatenate([in_distribution, noise]).reshape(10, 1, 28, 28)


@dataclass
class LiveStack:
    """A running service and the Prometheus scraping it, after traffic was sent and scraped."""

    service_url: str
    prometheus_url: str
    model: str
    scored: int
    ood: int
    metrics_text: str
    workdir: Path

    def query(self, expr: str) -> dict[str, Any]:
        return prometheus_query(self.prometheus_url, expr)

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)["data"]["result"]
        return float(result[0]["value"][1]) if result else None
