"""The Prometheus metrics: sliding OOD-rate window, per-ONNX-model inference timing, batch sizes, reload counts,
model info that follows the served engines, bounded label values."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from oodserve.engine import Engine
from oodserve.observability.batched_histogram import BatchedHistogram
from oodserve.observability.metrics import P_VALUE_BUCKETS, ServiceMetrics, VerdictWindow
from oodserve.runtime.sessions import RuntimeOptions
from oodserve.server.app import create_app

ONE_THREAD = RuntimeOptions(intra_op_threads=1, inter_op_threads=1)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def exposition(metrics: ServiceMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return samples(generate_latest(metrics.registry).decode())


def test_verdict_window_keeps_the_last_verdicts_only() -> None:
    window = VerdictWindow(4)
    assert math.isnan(window.add([]))
    assert window.add([True]) == 1.0
    assert window.add([False, False, False]) == 0.25
    assert window.add([False]) == 0.0  # the True fell out
    assert window.add([True, True, True, True, True, False]) == 0.75
    assert len(window) == 4
    with pytest.raises(ValueError):
        VerdictWindow(0)


def test_scoring_records_ood_rate_batches_and_inference_per_onnx_model(bundle_dir: Path, settings_for, make_images) -> None:
    zeros = np.zeros((2, 1, 28, 28), dtype=np.uint8)  # far from the test density: OOD
    with TestClient(create_app(settings_for(bundle_dir, ood_rate_window=4))) as client:
        first = client.post("/v1/score", json={"instances": make_images(3, 5).tolist()}).json()["results"]
        second = client.post("/v1/score", json={"instances": zeros.tolist()}).json()["results"]
        text = client.get("/metrics").text
    values = samples(text)
    model = (("model", "test-bundle"),)
    last_four = [result["is_ood"] for result in first + second][-4:]
    assert all(result["is_ood"] for result in second)
    assert values[("oodserve_ood_rate", model)] == sum(last_four) / 4
    assert values[("oodserve_default_alpha", model)] == 0.1
    assert values[("oodserve_request_instances_count", model)] == 2
    assert values[("oodserve_request_instances_sum", model)] == 5
    assert values[("oodserve_batch_instances_sum", model)] == 5  # warm-up runs happen before tracking starts
    for onnx_model in ("flow", "background", "sngp"):
        key = ("oodserve_inference_duration_seconds_count", (("model", "test-bundle"), ("onnx_model", onnx_model)))
        assert values[key] == values[("oodserve_batch_instances_count", model)]
        assert values[("oodserve_inference_duration_seconds_sum", key[1])] > 0
    assert values[("oodserve_execution_provider_available", (("provider", "CPUExecutionProvider"),))] == 1
    assert values[("oodserve_bundle_reloads_total", (("result", "success"),))] == 0
    assert values[("oodserve_bundle_reloads_total", (("result", "failure"),))] == 0
    p_value_buckets = {labels for name, labels in values if name == "oodserve_fused_p_value_bucket"}
    assert ("le", "0.05") in {pair for labels in p_value_buckets for pair in labels}


def test_verdict_counters_exist_at_zero_before_traffic(client: TestClient) -> None:
    values = samples(client.get("/metrics").text)
    for verdict in ("ood", "in_distribution"):
        assert ("oodserve_inputs_scored_total", (("model", "test-bundle"), ("verdict", verdict))) in values


def test_unknown_http_methods_share_one_label_value(client: TestClient) -> None:
    client.request("BREW", "/healthz")
    values = samples(client.get("/metrics").text)
    methods = {dict(labels).get("method") for name, labels in values if name == "oodserve_http_requests_total"}
    assert "other" in methods and "BREW" not in methods


def test_queue_wait_is_observed_per_model() -> None:
    metrics = ServiceMetrics()
    metrics.observe_queue_wait("m", 0.003)
    metrics.observe_queue_wait("m", 0.0002)
    values = exposition(metrics)
    assert values[("oodserve_queue_wait_seconds_count", (("model", "m"),))] == 2
    assert values[("oodserve_queue_wait_seconds_bucket", (("le", "0.0005"), ("model", "m")))] == 1


def test_reloads_are_counted_and_model_series_follow_the_new_engines(bundle_dir: Path, bundle_factory) -> None:
    old = Engine.load(bundle_dir, ONE_THREAD)
    new = Engine.load(bundle_factory(name="renamed-bundle"), ONE_THREAD)
    metrics = ServiceMetrics()
    metrics.track_registry([old], available_providers=["CPUExecutionProvider"])
    old.runner.run(np.zeros((3, 1, 28, 28), dtype=np.float32))
    old_model = (("model", "test-bundle"),)
    assert exposition(metrics)[("oodserve_batch_instances_sum", old_model)] == 3

    metrics.record_reload("failure")
    metrics.record_reload("success", [new])
    values = exposition(metrics)
    assert values[("oodserve_bundle_reloads_total", (("result", "failure"),))] == 1
    assert values[("oodserve_bundle_reloads_total", (("result", "success"),))] == 1
    info = {labels for name, labels in values if name == "oodserve_model_info"}
    assert info == {(("model", "renamed-bundle"), ("provider", "CPUExecutionProvider"), ("version", "1.2.3"))}
    assert ("oodserve_default_alpha", old_model) not in values
    assert values[("oodserve_default_alpha", (("model", "renamed-bundle"),))] == 0.1
    new.runner.run(np.zeros((2, 1, 28, 28), dtype=np.float32))
    assert exposition(metrics)[("oodserve_batch_instances_sum", (("model", "renamed-bundle"),))] == 2
    with pytest.raises(ValueError, match="reload result"):
        metrics.record_reload("partial")


def test_batched_requests_record_their_queue_wait(bundle_dir: Path, make_images, settings_for) -> None:
    with TestClient(create_app(settings_for(bundle_dir))) as client:
        for seed in range(3):
            assert client.post("/v1/score", json={"instances": make_images(2, seed).tolist()}).status_code == 200
        values = samples(client.get("/metrics").text)
    counts = {labels: value for (name, labels), value in values.items() if name == "oodserve_queue_wait_seconds_count"}
    assert counts[(("model", "test-bundle"),)] == 3


def test_batched_histogram_exposes_what_one_observe_per_value_would() -> None:
    """Same buckets and counts as prometheus-client's Histogram fed value by value (the sums may differ in the last
    bits: summation order), including values on a bucket bound, above the largest finite one, and empty rows."""
    from prometheus_client import CollectorRegistry, Histogram


    batched_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    batched = BatchedHistogram("p", "p-values", ["model", "signal"], P_VALUE_BUCKETS)
    batched_registry.register(batched)
    reference = Histogram("p", "p-values", ["model", "signal"], buckets=P_VALUE_BUCKETS, registry=reference_registry)
    rng = np.random.default_rng(3)
    labels = [("m", "a"), ("m", "b"), ("n", "a")]
    for size in (0, 1, 7, 64):
        rows = rng.uniform(0.0, 1.2, size=(3, size))
        if size:
            rows[0, 0], rows[1, 0], rows[2, 0] = 0.05, 1.0, 0.001  # exactly on bounds: counted in that bucket (le)
        batched.observe_rows(labels, rows)
        for row, (model, signal) in zip(rows, labels):
            for value in row:
                reference.labels(model=model, signal=signal).observe(value)
    batched.observe_many(("m", "a"), np.array([0.3, 0.7]))
    for value in (0.3, 0.7):
        reference.labels(model="m", signal="a").observe(value)
    got = samples(generate_latest(batched_registry).decode())
    expected = samples(generate_latest(reference_registry).decode())
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key[0].endswith("_sum"):
            assert got[key] == pytest.approx(value, rel=1e-12)
        else:
            assert got[key] == value, key
    with pytest.raises(ValueError, match="shape"):
        batched.observe_rows(labels, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="labels"):
        batched.observe_many(("m",), np.zeros(3))


def test_p_value_histograms_count_each_scored_instance_once_per_merged_run(bundle_dir: Path, settings_for, make_images) -> None:
    """The p-value series are fed once per onnxruntime batch (the engine hook), not per request: every signal's
    count equals the instances scored, and the fused count too."""
    with TestClient(create_app(settings_for(bundle_dir))) as client:
        for count in (1, 3, 4):
            assert client.post("/v1/score", json={"instances": make_images(count, count).tolist()}).status_code == 200
        signals = [signal["name"] for signal in client.get("/v1/models/test-bundle").json()["signals"]]
        values = samples(client.get("/metrics").text)
    for signal in signals:
        assert values[("oodserve_signal_p_value_count", (("model", "test-bundle"), ("signal", signal)))] == 8
    assert values[("oodserve_fused_p_value_count", (("model", "test-bundle"),))] == 8
