"""The shared drift store against a real redis-server: the same numbers as the in-memory monitor, one state per
stream across replicas (eviction, bounds, reloads), calls applied once, the null false-alarm rate over many replays
fed round-robin by three replicas, and the store going away (buffered, reported unavailable, restarted on a gap)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from oodserve.config import Settings
from oodserve.drift.factory import create_drift_store
from oodserve.drift.monitor import DriftMonitor, DriftSettings
from oodserve.drift.redis_store import RedisDriftStore
from oodserve.drift.store import StoreOptions
from oodserve.server.app import create_app
from oodserve.stats import clopper_pearson
from tests.helpers.redis_server import RedisServer, server_binary

pytestmark = pytest.mark.skipif(server_binary() is None, reason="no redis-server installed (make test installs it)")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path / "store", appendonly=True) as running:
        yield running


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.02)


def replica(server: RedisServer, settings: DriftSettings, **options: object) -> RedisDriftStore:
    return RedisDriftStore(settings, StoreOptions(url=server.url, **options))  # type: ignore[arg-type]


def test_the_shared_store_computes_what_the_in_memory_monitor_does(server: RedisServer) -> None:
    rng = np.random.default_rng(0)
    calibration = np.round(rng.normal(size=800), 2)  # rounded: many ties, so the tie-breaking draws matter
    stream = np.round(np.concatenate([rng.normal(size=1500), rng.normal(loc=1.5, size=400)]), 2)
    settings = DriftSettings(change_threshold=1e4, seed=3)
    memory = DriftMonitor(settings)
    store = replica(server, settings)
    store._rng = np.random.default_rng(np.random.default_rng(3).integers(0, 2**63))  # the monitor's draws for its first stream
    try:
        for start in range(0, len(stream), 37):
            memory.observe("m", "s", calibration, stream[start : start + 37])
            store.observe("m", "s", calibration, stream[start : start + 37])
        assert store.flush(20)
        (expected,), (got,) = memory.reports(), store.reports()
        assert got.inputs_since_reset == expected.inputs_since_reset == len(stream)
        for name in ("log10_martingale", "log10_martingale_max", "log10_change_statistic"):
            assert math.isclose(getattr(got, name), getattr(expected, name), rel_tol=1e-9, abs_tol=1e-9), name
        assert (got.alarm, got.change_alarm, got.alarms_total) == (expected.alarm, expected.change_alarm, expected.alarms_total)
        assert got.alarm and got.alarms_total["martingale"] == 1
    finally:
        store.close()


def test_replicas_share_streams_eviction_and_reloads(server: RedisServer) -> None:
    settings = DriftSettings(max_streams=2, max_stream_inputs=100)
    first, second = replica(server, settings), replica(server, settings)
    calibration = np.arange(100.0)
    try:
        first.observe("m", "a", calibration, np.full(5, 50.0))
        assert first.flush(10)
        second.observe("m", "a", calibration, np.full(3, 50.0))
        second.observe("m", "b", calibration, np.full(2, 50.0))
        assert second.flush(10)
        first.observe("m", "c", calibration, np.array([1.0]))  # a is least recently used across both replicas
        assert first.flush(10)
        snapshot = second.snapshot()
        assert {report.stream: report.inputs_since_reset for report in snapshot.reports} == {"b": 2, "c": 1}
        assert snapshot.evicted == {"m": 1} and snapshot.available
        (calibration_key,) = server.client().keys("oodserve:drift:cal:m:*")
        assert 0 < server.client().ttl(calibration_key) <= 86_400  # a bundle no longer served leaves nothing behind
        server.client().delete(calibration_key)  # expired: the next call loads it again
        first.observe("m", "b", calibration, np.full(1, 50.0))
        assert first.flush(10) and first.snapshot().available
        second.observe("m", "c", calibration + 1.0, np.array([1.0]))  # another bundle's calibration: a restart
        assert second.flush(10)
        snapshot = first.snapshot("m")
        assert {report.stream: report.inputs_since_reset for report in snapshot.reports} == {"b": 3, "c": 1}
        assert snapshot.restarts == {("m", "reload"): 1}
        assert first.reset("m", "b") == 1 and first.snapshot().restarts[("m", "admin")] == 1
        first.observe("m", "c", calibration + 1.0, np.full(150, 5.0))
        second.observe("m", "c", calibration + 1.0, np.full(100, 5.0))
        assert first.flush(10) and second.flush(10)  # 1 + 250 inputs: restarted at 100 and at 200
        snapshot = second.snapshot()
        assert {report.stream: report.inputs_since_reset for report in snapshot.reports}["c"] == 51
        assert snapshot.restarts[("m", "bound")] == 2
    finally:
        first.close()
        second.close()


def test_a_retried_call_is_applied_once(server: RedisServer) -> None:
    store = replica(server, DriftSettings())
    try:
        store.observe("m", "s", np.arange(10.0), np.arange(4.0))
        with store._lock:
            store._form_calls()
            call = store._in_flight.popleft()
        store._send(call)
        store._send(call)  # as after a timeout whose script had run
        assert store.reports()[0].inputs_since_reset == 4
    finally:
        store.close()


def test_null_false_alarm_rate_with_three_replicas_round_robin(server: RedisServer) -> None:
    """Clean streams split batch by batch over three replicas (each with its own worker and tie-breaking draws):
    the shared test alarms at most at rate delta (Ville). delta = 0.2 keeps the run small and the bound testable:
    the test fails when the Clopper-Pearson interval of the rate lies wholly above delta. Beside it, the same streams
    tested per replica (one in-memory monitor each): the chance that any of the three alarms."""
    delta, replays, length = 0.2, 60, 600
    settings = DriftSettings(delta=delta, max_streams=replays)
    replicas = [replica(server, settings) for _ in range(3)]
    separate = [DriftMonitor(DriftSettings(delta=delta, max_streams=replays, seed=index)) for index in range(3)]
    try:
        for index in range(replays):
            rng = np.random.default_rng([7, index])
            pool = rng.normal(size=5000)
            calibration, stream = rng.choice(pool, 300), rng.choice(pool, length)
            for turn, start in enumerate(range(0, length, 20)):
                replicas[turn % 3].observe("m", f"r{index}", calibration, stream[start : start + 20])
                separate[turn % 3].observe("m", f"r{index}", calibration, stream[start : start + 20])
        assert all(store.flush(60) for store in replicas)
        reports = replicas[0].snapshot().reports
        assert len(reports) == replays and all(report.inputs_since_reset == length for report in reports)
        shared = sum(report.alarm for report in reports)
        per_replica = sum(any(report.alarm for monitor in separate for report in monitor.reports() if report.stream == f"r{index}")
                          for index in range(replays))
        low, _ = clopper_pearson(shared, replays)
        assert low <= delta, f"{shared}/{replays} shared streams alarmed at delta {delta}"
        print(f"false alarms at delta {delta}: shared {shared}/{replays}, any of three separate replicas {per_replica}/{replays}")
    finally:
        for store in replicas:
            store.close()


def test_store_down_holds_inputs_reports_unavailable_and_restarts_streams_that_lost_inputs(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "store", appendonly=True).start()
    store = replica(server, DriftSettings(), buffer_inputs=50)
    calibration = np.arange(100.0)
    try:
        store.observe("m", "kept", calibration, np.full(10, 5.0))
        store.observe("m", "gap", calibration, np.full(10, 5.0))
        assert store.flush(10)
        server.stop()
        store.observe("m", "gap", calibration, np.full(30, 5.0))
        wait_until(lambda: not store.available)  # scoring went on; the worker found the store gone
        store.observe("m", "kept", calibration, np.full(40, 5.0))  # 70 > 50 held: the oldest (gap's 30) are dropped
        status = store.snapshot().store
        assert status["status"] == "unavailable" and status["dropped_inputs"] == 30 and status["pending_inputs"] == 40
        server.start()  # the same append-only file: the state is back
        assert store.flush(20)
        store.observe("m", "gap", calibration, np.full(4, 5.0))  # the first inputs after its hole: a restart
        assert store.flush(20)
        snapshot = store.snapshot()
        assert snapshot.available and snapshot.store["dropped_inputs"] == 30
        counts = {report.stream: report.inputs_since_reset for report in snapshot.reports}
        assert counts == {"kept": 50, "gap": 4}  # kept lost nothing: it goes on
        assert snapshot.restarts == {("m", "gap"): 1}
    finally:
        store.close()
        server.kill()


@pytest.mark.parametrize("appendonly", [True, False])
def test_a_store_restart_keeps_the_streams_only_when_it_persists(tmp_path: Path, appendonly: bool) -> None:
    server = RedisServer(tmp_path / "store", appendonly=appendonly).start()
    store = create_drift_store(DriftSettings(), StoreOptions(url=server.url))
    assert isinstance(store, RedisDriftStore)
    calibration = np.arange(100.0)
    try:
        store.observe("m", "s", calibration, np.full(25, 5.0))
        assert store.flush(10)
        before = store.reports()[0]
        server.stop()
        server.start()
        store.observe("m", "s", calibration, np.full(5, 5.0))
        assert store.flush(20)
        after = store.reports()[0]
        if appendonly:
            assert after.inputs_since_reset == 30 and after.since == before.since
        else:  # everything was lost: the stream starts afresh, calibration reloaded by the replica
            assert after.inputs_since_reset == 5 and after.since > before.since
    finally:
        store.close()
        server.kill()


def test_the_password_from_the_settings_opens_a_protected_store_and_a_wrong_one_reports_unavailable(tmp_path: Path) -> None:
    with RedisServer(tmp_path / "store", appendonly=False, password="s3cret") as server:
        good = replica(server, DriftSettings(), password="s3cret")
        bad = RedisDriftStore(DriftSettings(), StoreOptions(url=f"redis://:wrong@127.0.0.1:{server.port}/0"))
        try:
            good.observe("m", "s", np.arange(10.0), np.arange(3.0))
            bad.observe("m", "s", np.arange(10.0), np.arange(3.0))
            assert good.flush(10)
            wait_until(lambda: not bad.available)
            assert good.snapshot().reports[0].inputs_since_reset == 3
            snapshot = bad.snapshot()
            assert snapshot.store["status"] == "unavailable" and snapshot.reports == [] and "Authentication" in str(snapshot.store["error"])
        finally:
            good.close()
            bad.close()


def test_the_store_setting_names_what_is_wrong() -> None:
    with pytest.raises(ValidationError, match="OODSERVE_DRIFT_STORE must be `memory` or a redis://"):
        Settings(drift_store="http://cache:6379")


def test_the_app_on_a_shared_store_scores_while_it_is_down_and_says_so(
    tmp_path: Path, bundle_dir: Path, settings_for: Callable[..., Settings], make_images: Callable[[int, int], np.ndarray]
) -> None:
    server = RedisServer(tmp_path / "store", appendonly=True).start()
    images = make_images(4, 3)
    settings = settings_for(bundle_dir, admin_keys=["admin-key"], drift_store=server.url)
    admin = {"authorization": "Bearer admin-key"}
    try:
        with TestClient(create_app(settings)) as client:
            name = client.get("/v1/models").json()["default"]
            assert client.post("/v1/score", json={"instances": images.tolist()}).status_code == 200
            assert isinstance(client.app.state.oodserve.drift, RedisDriftStore)  # type: ignore[attr-defined]
            assert client.app.state.oodserve.drift.flush(10)  # type: ignore[attr-defined]
            drift = client.get(f"/v1/models/{name}/drift").json()
            assert drift["store"]["kind"] == "redis" and drift["store"]["status"] == "ok"
            assert [stream["inputs_since_reset"] for stream in drift["streams"]] == [4]
            assert 'oodserve_drift_store_up{kind="redis"} 1.0' in client.get("/metrics").text
            server.kill()
            assert client.post("/v1/score", json={"instances": images.tolist()}).status_code == 200  # scoring goes on
            drift = client.get(f"/v1/models/{name}/drift")
            assert drift.status_code == 200 and drift.json()["store"]["status"] == "unavailable" and drift.json()["streams"] == []
            assert 'oodserve_drift_store_up{kind="redis"} 0.0' in client.get("/metrics").text
            reset = client.post("/v1/admin/drift/reset", headers=admin)
            assert reset.status_code == 503 and reset.json()["error"]["code"] == "drift_store_unavailable"
            server.start()
            assert client.app.state.oodserve.drift.flush(20)  # type: ignore[attr-defined]
            streams = client.get(f"/v1/models/{name}/drift").json()["streams"]
            assert [stream["inputs_since_reset"] for stream in streams] == [8]  # held while it was down, then sent
    finally:
        server.kill()
