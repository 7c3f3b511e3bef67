"""Fixture of the deployment tests: a live stack (the service in a uvicorn subprocess scraped by a real Prometheus
server built from the shipped config) with scoring traffic sent through it and scraped."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator

import pytest
import yaml

from oodserve.bench.http_driver import free_port
from tests.helpers.deploy_support import (
    DEMO_BUNDLE,
    PROMETHEUS_DIR,
    STARTUP_SECONDS,
    LiveStack,
    http_get,
    http_post_json,
    prometheus_config_for,
    prometheus_query,
    scoring_images,
    start_service,
    stop,
    tool,
    wait_until,
)


@pytest.fixture(scope="session")
def live_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    prometheus_binary = tool("prometheus")
    workdir = tmp_path_factory.mktemp("live-stack")
    service_port, prometheus_port = free_port(), free_port()
    service_url, prometheus_url = f"http://127.0.0.1:{service_port}", f"http://127.0.0.1:{prometheus_port}"
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(prometheus_config_for(f"127.0.0.1:{service_port}", PROMETHEUS_DIR / "alerts.yml")))
    service = start_service(DEMO_BUNDLE, service_port, workdir / "service.log")
    prometheus = None
    try:
        wait_until(lambda: http_get(f"{service_url}/readyz")[0] == 200, STARTUP_SECONDS, "service ready", service)
        prometheus = subprocess.Popen(
            [
                prometheus_binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{prometheus_port}",
                "--log.level=warn",
            ],
            cwd=workdir,
            stdout=(workdir / "prometheus.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: http_get(f"{prometheus_url}/-/ready")[0] == 200, STARTUP_SECONDS, "prometheus ready", prometheus)
        # Let Prometheus see the zero-initialised counters first so increase() and rate() have a start.
        wait_until(
            lambda: bool(prometheus_query(prometheus_url, "oodserve_inputs_scored_total")["data"]["result"]),
            30,
            "first scrape of oodserve_inputs_scored_total",
            prometheus,
        )
        images = scoring_images()
        scored = ood = 0
        model = ""
        for batch in (images[:5], images[5:]):
            answer = http_post_json(f"{service_url}/v1/score", {"instances": batch.tolist()})
            model = answer["model"]
            scored += len(answer["results"])
            ood += sum(result["is_ood"] for result in answer["results"])
            time.sleep(1.5)  # one scrape between the two requests: rates see two increasing samples
        wait_until(
            lambda: prometheus_query(prometheus_url, "sum(oodserve_inputs_scored_total)")["data"]["result"][0]["value"][1] == str(scored),
            30,
            "scored instances visible in prometheus",
            prometheus,
        )
        # Series born with the first request need two samples before rate() and histogram_quantile() see them.
        wait_until(
            lambda: (
                float(
                    prometheus_query(
                        prometheus_url, 'min(count_over_time(oodserve_http_request_duration_seconds_count{endpoint="/v1/score"}[5m]))'
                    )["data"]["result"][0]["value"][1]
                )
                >= 2
            ),
            30,
            "two scrapes of the scoring route's latency histogram",
            prometheus,
        )
        metrics_text = http_get(f"{service_url}/metrics")[1].decode()
        yield LiveStack(service_url, prometheus_url, model, scored, ood, metrics_text, workdir)
    finally:
        if prometheus is not None:
            stop(prometheus)
        stop(service)
