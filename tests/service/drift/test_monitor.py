"""Streams of the drift monitor (bounded, restarted at the bound and on reload) and the drift API."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from oodserve.drift.monitor import DriftMonitor, DriftSettings
from oodserve.server.app import create_app

ADMIN = {"authorization": "Bearer admin-key"}


def test_streams_are_bounded_least_recently_used_first() -> None:
    monitor = DriftMonitor(DriftSettings(max_streams=2, seed=0))
    calibration = np.arange(100.0)
    for stream in ("a", "b", "a", "c"):  # c pushes out b, the least recently used
        monitor.observe("m", stream, calibration, np.array([50.0]))
    assert sorted(report.stream for report in monitor.reports()) == ["a", "c"]
    assert monitor.evicted == {"m": 1}
    assert {report.stream: report.inputs_since_reset for report in monitor.reports()} == {"a": 2, "c": 1}


def test_a_stream_restarts_at_its_bound_and_when_the_calibration_changes() -> None:
    monitor = DriftMonitor(DriftSettings(max_stream_inputs=100, seed=0))
    calibration = np.arange(100.0)
    monitor.observe("m", "s", calibration, np.full(250, 50.0))
    (report,) = monitor.reports()
    assert report.inputs_since_reset == 50 and monitor.restarts == {("m", "bound"): 2}
    monitor.observe("m", "s", calibration.copy(), np.array([1.0]))  # another array: a reloaded bundle
    assert monitor.reports()[0].inputs_since_reset == 1 and monitor.restarts[("m", "reload")] == 1


def test_an_ood_stream_alarms_and_stays_in_alarm_until_reset() -> None:
    rng = np.random.default_rng(0)
    monitor = DriftMonitor(DriftSettings(delta=0.01, change_threshold=1e6, seed=0))
    calibration = rng.normal(size=500)
    monitor.observe("m", "clean", calibration, rng.normal(size=2000))
    monitor.observe("m", "shifted", calibration, rng.normal(size=500))
    monitor.observe("m", "shifted", calibration, rng.normal(loc=4.0, size=100))
    monitor.observe("m", "shifted", calibration, rng.normal(size=500))  # back to normal: the alarm latches
    reports = {report.stream: report for report in monitor.reports()}
    assert not reports["clean"].alarm and not reports["clean"].change_alarm
    shifted = reports["shifted"]
    assert shifted.alarm and shifted.change_alarm and shifted.alarms_total == {"martingale": 1, "change": 1}
    assert reports["shifted"].log10_martingale_max >= 2.0
    assert monitor.reset("m", "shifted") == 1
    reports = {report.stream: report for report in monitor.reports()}
    assert not reports["shifted"].alarm and reports["shifted"].inputs_since_reset == 0
    assert reports["shifted"].alarms_total == {"martingale": 1, "change": 1}  # counters survive a restart


def test_drift_api_per_stream_header_reset_and_metrics(
    bundle_dir: Path, settings_for: Callable[..., object], make_images: Callable[[int, int], np.ndarray]
) -> None:
    images = make_images(8, 5)
    with TestClient(create_app(settings_for(bundle_dir, admin_keys=["admin-key"]))) as client:  # type: ignore[arg-type]
        assert client.post("/v1/score", json={"instances": images[:4].tolist()}).status_code == 200
        body = {"inputs": [{"name": "x", "shape": [2, 1, 28, 28], "datatype": "UINT8", "data": images[4:6].ravel().tolist()}]}
        name = client.get("/v1/models").json()["default"]
        assert client.post(f"/v2/models/{name}/infer", json=body, headers={"x-ood-stream": "client-7"}).status_code == 200
        drift = client.get(f"/v1/models/{name}/drift").json()
        streams = {stream["stream"]: stream for stream in drift["streams"]}
        assert streams["default"]["inputs_since_reset"] == 4 and streams["client-7"]["inputs_since_reset"] == 2
        assert streams["default"]["alarm"] is False and drift["martingale_threshold"] == 100.0
        assert drift["store"] == {"kind": "memory", "status": "ok"}
        series = 'oodserve_drift_log10_martingale{model="' + name + '",stream="client-7"}'
        assert series in client.get("/metrics").text

        bad = client.post("/v1/score", json={"instances": images[:1].tolist()}, headers={"x-ood-stream": "no spaces"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_stream"
        too_long = client.post(f"/v2/models/{name}/infer", json=body, headers={"x-ood-stream": "x" * 65})
        assert too_long.status_code == 400 and "X-OOD-Stream" in too_long.json()["error"]  # v2 words every client error as 400
        assert client.get("/v1/models/nope/drift").status_code == 404

        assert client.post("/v1/admin/drift/reset").status_code == 401
        reset = client.post("/v1/admin/drift/reset", json={"stream": "client-7"}, headers=ADMIN)
        assert reset.status_code == 200 and reset.json()["streams"] == 1
        assert client.post("/v1/admin/drift/reset", json={"model": "nope"}, headers=ADMIN).status_code == 404
        assert client.post("/v1/admin/drift/reset", json={"stream": 3}, headers=ADMIN).status_code == 422
        streams = {stream["stream"]: stream for stream in client.get(f"/v1/models/{name}/drift").json()["streams"]}
        assert streams["client-7"]["inputs_since_reset"] == 0 and streams["default"]["inputs_since_reset"] == 4


def test_drift_can_be_switched_off(bundle_dir: Path, settings_for: Callable[..., object]) -> None:
    with TestClient(create_app(settings_for(bundle_dir, drift=False))) as client:  # type: ignore[arg-type]
        name = client.get("/v1/models").json()["default"]
        response = client.get(f"/v1/models/{name}/drift")
        assert response.status_code == 404 and response.json()["error"]["code"] == "drift_disabled"
