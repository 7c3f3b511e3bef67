"""Readiness (503 before the bundle is loaded and warmed up), model summaries and Prometheus metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from oodserve.server.app import create_app
from oodserve.server.state import app_state


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_not_ready_before_startup_then_ready(bundle_dir: Path, settings_for) -> None:
    app = create_app(settings_for(bundle_dir))
    before = TestClient(app)  # no `with`: the lifespan (load + warm-up) has not run
    assert before.get("/healthz").json() == {"status": "ok"}
    response = before.get("/readyz")
    assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
    assert before.post("/v1/score", json={"instances": [np.zeros((28, 28), int).tolist()]}).status_code == 503
    assert before.get("/v1/models").status_code == 503
    assert samples(before.get("/metrics").text)[("oodserve_ready", ())] == 0.0
    with TestClient(app) as ready:
        assert ready.get("/readyz").json() == {"status": "ready", "models": ["test-bundle"]}
        assert samples(ready.get("/metrics").text)[("oodserve_ready", ())] == 1.0
    assert app_state(app).ready is False  # shutdown makes it unready again


def test_models_summary_reports_the_active_provider(client: TestClient) -> None:
    listing = client.get("/v1/models").json()
    assert listing["default"] == "test-bundle"
    summary = client.get("/v1/models/test-bundle").json()
    assert listing["models"] == [summary]
    assert summary["version"] == "1.2.3"
    assert summary["provider"] == "CPUExecutionProvider"
    assert {model["provider"] for model in summary["models"].values()} == {"CPUExecutionProvider"}
    assert summary["input"] == {"shape": [1, 28, 28], "dtype": "uint8", "min": 0.0, "max": 255.0, "layout": "NCHW"}
    assert summary["accepted_instance_shapes"] == [[1, 28, 28], [28, 28]]
    assert summary["labels"][:2] == ["class-0", "class-1"]
    assert [signal["name"] for signal in summary["signals"]][:2] == ["bits_per_dim", "typicality"]
    assert summary["signals"][0]["calibration_size"] == 150
    assert summary["fusion"]["method"] == "fisher" and summary["fusion"]["calibration_size"] == 150


def test_metrics_count_requests_verdicts_and_p_values(bundle_dir: Path, settings_for, make_images) -> None:
    with TestClient(create_app(settings_for(bundle_dir))) as client:
        images = np.concatenate([make_images(3, 91), np.zeros((2, 1, 28, 28), dtype=np.uint8)])
        results = client.post("/v1/score", json={"instances": images.tolist()}).json()["results"]
        client.post("/v1/score", json={"instances": []})
        client.get("/v1/models/nope")
        client.get("/no/such/path")
        text = client.get("/metrics").text
    values = samples(text)
    ood = sum(result["is_ood"] for result in results)
    assert values[("oodserve_inputs_scored_total", (("model", "test-bundle"), ("verdict", "ood")))] == ood
    assert values[("oodserve_inputs_scored_total", (("model", "test-bundle"), ("verdict", "in_distribution")))] == 5 - ood
    score_route = (("endpoint", "/v1/score"), ("method", "POST"))
    assert values[("oodserve_http_requests_total", (*score_route, ("status", "200")))] == 1
    assert values[("oodserve_http_requests_total", (*score_route, ("status", "422")))] == 1
    assert values[("oodserve_http_requests_total", (("endpoint", "/v1/models/{name}"), ("method", "GET"), ("status", "404")))] == 1
    assert values[("oodserve_http_requests_total", (("endpoint", "unmatched"), ("method", "GET"), ("status", "404")))] == 1
    assert values[("oodserve_http_request_duration_seconds_count", score_route)] == 2
    assert values[("oodserve_signal_p_value_count", (("model", "test-bundle"), ("signal", "typicality")))] == 5
    assert values[("oodserve_fused_p_value_count", (("model", "test-bundle"),))] == 5
    assert values[("oodserve_model_info", (("model", "test-bundle"), ("provider", "CPUExecutionProvider"), ("version", "1.2.3")))] == 1


def test_openapi_documents_the_score_request(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    score = schema["paths"]["/v1/score"]["post"]
    assert "instances" in score["requestBody"]["content"]["application/json"]["schema"]["properties"]
    assert {"200", "400", "413", "415", "422"} <= set(score["responses"])
    assert client.get("/docs").status_code == 200
