"""Hot reload: scoring traffic through good and broken reloads fails zero requests; in-flight requests finish on
the old bundle; refused reloads keep the old bundle and say why; SIGHUP reloads a real server."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

import oodserve.server.reload
from oodserve.engine import Engine
from oodserve.runtime.sessions import RuntimeOptions
from oodserve.server.app import create_app
from oodserve.server.state import app_state
from tests.helpers.live_server import ServeProcess, uvicorn_in_thread

ADMIN = {"authorization": "Bearer admin-key"}
OPTIONS = RuntimeOptions(intra_op_threads=1, inter_op_threads=1)


@pytest.fixture(scope="module")
def second_bundle(bundle_factory: Callable[..., Path]) -> Path:
    """Same name as the standard bundle, different models (seed 5): its scores tell which bundle answered."""
    return bundle_factory(seed=5)


def tampered_copy(bundle: Path, destination: Path) -> Path:
    copy = Path(shutil.copytree(bundle, destination))
    data = bytearray((copy / "sngp.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "sngp.onnx").write_bytes(bytes(data))
    return copy


def missing_file_copy(bundle: Path, destination: Path) -> Path:
    copy = Path(shutil.copytree(bundle, destination))
    (copy / "calibration.npz").unlink()
    return copy


def extra_file_copy(bundle: Path, destination: Path) -> Path:
    copy = Path(shutil.copytree(bundle, destination))
    (copy / "README.txt").write_text("not listed in the manifest")
    return copy


def expected_scores(bundle: Path, images: np.ndarray) -> list[float]:
    engine = Engine.load(bundle, OPTIONS)
    return [result.score for result in engine.score_batch(images.astype(np.float32))]


def which_bundle(scores: list[float], candidates: dict[str, list[float]]) -> str | None:
    """The name of the candidate whose scores all equal `scores` (None: a mix or neither)."""
    for name, expected in candidates.items():
        if np.allclose(scores, expected, rtol=1e-9, atol=1e-9):
            return name
    return None


def test_scoring_traffic_through_good_and_broken_reloads_fails_no_request(
    bundle_dir: Path,
    second_bundle: Path,
    settings_for: Callable[..., Any],
    make_images: Callable[[int, int], np.ndarray],
    tmp_path: Path,
) -> None:
    images = make_images(3, 77)
    payload = {"instances": images.tolist()}
    candidates = {"A": expected_scores(bundle_dir, images), "B": expected_scores(second_bundle, images)}
    assert which_bundle(candidates["A"], {"B": candidates["B"]}) is None  # the two bundles are distinguishable
    reloads: list[tuple[Path, int, str | None]] = [
        (second_bundle, 200, "B"),
        (tampered_copy(second_bundle, tmp_path / "tampered"), 422, "altered file 'sngp.onnx'"),
        (bundle_dir, 200, "A"),
        (missing_file_copy(second_bundle, tmp_path / "missing"), 422, "missing file 'calibration.npz'"),
        (second_bundle, 200, "B"),
        (extra_file_copy(bundle_dir, tmp_path / "extra"), 422, "unexpected file 'README.txt'"),
        (tmp_path / "nowhere", 422, "does not exist"),
        (bundle_dir, 200, "A"),
    ]
    settings = settings_for(bundle_dir, admin_keys=["admin-key"])
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def client_loop(base_url: str) -> None:
        with httpx.Client(base_url=base_url, timeout=30) as client:
            while not stop.is_set():
                try:
                    response = client.post("/v1/score", json=payload)
                except httpx.HTTPError as error:
                    with lock:
                        outcomes["failed"] += 1
                        failures.append(repr(error))
                    continue
                served = which_bundle([r["score"] for r in response.json()["results"]], candidates) if response.status_code == 200 else None
                with lock:
                    outcomes["sent"] += 1
                    if served is None:
                        outcomes["failed"] += 1
                        failures.append(f"{response.status_code} {response.text[:200]}")
                    else:
                        outcomes[served] += 1

    with uvicorn_in_thread(create_app(settings)) as base_url:
        workers = [threading.Thread(target=client_loop, args=(base_url,)) for _ in range(4)]
        for worker in workers:
            worker.start()
        try:
            with httpx.Client(base_url=base_url, timeout=60, headers=ADMIN) as admin:
                for bundle, status, expectation in reloads:
                    time.sleep(0.3)  # let traffic run on the current bundle
                    response = admin.post("/v1/admin/reload", json={"bundle": str(bundle)})
                    assert response.status_code == status, response.text
                    if status == 200:
                        check = admin.post("/v1/score", json=payload).json()
                        assert which_bundle([r["score"] for r in check["results"]], candidates) == expectation
                    else:
                        error = response.json()["error"]
                        assert error["code"] == "bundle_refused" and expectation in error["message"], error
                        assert "still serving test-bundle 1.2.3" in error["message"]
                time.sleep(0.3)
                metrics = admin.get("/metrics").text
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=60)
    print(f"\nreload test: {outcomes['sent']} scoring requests sent, {outcomes['failed']} failed "
          f"({outcomes['A']} answered by bundle A, {outcomes['B']} by bundle B) through {len(reloads)} reloads")
    assert outcomes["failed"] == 0, failures[:5]
    assert outcomes["sent"] > 0 and outcomes["A"] > 0 and outcomes["B"] > 0
    assert 'oodserve_bundle_reloads_total{result="success"} 4.0' in metrics
    assert 'oodserve_bundle_reloads_total{result="failure"} 4.0' in metrics


def test_in_flight_request_finishes_on_the_old_bundle(
    bundle_dir: Path,
    second_bundle: Path,
    settings_for: Callable[..., Any],
    make_images: Callable[[int, int], np.ndarray],
) -> None:
    images = make_images(2, 5)
    candidates = {"A": expected_scores(bundle_dir, images), "B": expected_scores(second_bundle, images)}
    with TestClient(create_app(settings_for(bundle_dir, admin_keys=["admin-key"]))) as client:
        old_runner = app_state(client.app).registry.default.runner
        entered, release = threading.Event(), threading.Event()
        original_run = old_runner.run

        def gated_run(*args: Any, **kwargs: Any) -> Any:
            entered.set()
            assert release.wait(timeout=30)
            return original_run(*args, **kwargs)

        old_runner.run = gated_run  # instance attribute: only the old bundle's onnxruntime run waits
        answers: dict[str, Any] = {}
        in_flight = threading.Thread(
            target=lambda: answers.update(response=client.post("/v1/score", json={"instances": images.tolist()}))
        )
        in_flight.start()
        assert entered.wait(timeout=30)  # the request is inside the old bundle's onnxruntime run
        reloaded = client.post("/v1/admin/reload", json={"bundle": str(second_bundle)}, headers=ADMIN)
        assert reloaded.status_code == 200, reloaded.text
        assert app_state(client.app).registry.default.runner is not old_runner
        release.set()
        in_flight.join(timeout=30)
        old_answer = answers["response"]
        assert old_answer.status_code == 200
        assert which_bundle([r["score"] for r in old_answer.json()["results"]], candidates) == "A"
        after = client.post("/v1/score", json={"instances": images.tolist()}).json()
        assert which_bundle([r["score"] for r in after["results"]], candidates) == "B"


def test_reload_request_errors_say_why_and_keep_serving(bundle_dir: Path, settings_for: Callable[..., Any]) -> None:
    with TestClient(create_app(settings_for(bundle_dir, admin_keys=["admin-key"]))) as client:
        served = app_state(client.app).registry
        same = client.post("/v1/admin/reload", headers=ADMIN)  # no body: reload the served directories
        assert same.status_code == 200 and same.json()["models"] == [
            {"name": "test-bundle", "version": "1.2.3", "bundle": str(bundle_dir)}
        ]
        assert app_state(client.app).registry is not served  # a fresh registry was swapped in
        cases = [
            ({"content": b"{", "headers": {"content-type": "application/json"}}, 400, "malformed_json"),
            ({"content": b'{"bundle": 3}', "headers": {"content-type": "application/json"}}, 422, "invalid_request"),
            ({"content": b'{"path": "x"}', "headers": {"content-type": "application/json"}}, 422, "invalid_request"),
            ({"content": b"[]", "headers": {"content-type": "application/json"}}, 422, "invalid_request"),
            ({"content": b'{"bundle": "x"}', "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type"),
            ({"json": {"bundle": "/definitely/not/here"}}, 422, "bundle_refused"),
        ]
        for request, status, code in cases:
            headers = {**ADMIN, **request.pop("headers", {})}
            response = client.post("/v1/admin/reload", headers=headers, **request)
            assert response.status_code == status, response.text
            assert response.json()["error"]["code"] == code
        assert client.post("/v1/score", json={"instances": [np.zeros((28, 28), int).tolist()]}).status_code == 200


def test_a_second_reload_while_one_runs_is_409(
    bundle_dir: Path, settings_for: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    entered, release = threading.Event(), threading.Event()
    real_load = oodserve.server.reload.load_and_warm_up

    def slow_load(*args: Any) -> Any:
        entered.set()
        assert release.wait(timeout=30)
        return real_load(*args)

    monkeypatch.setattr(oodserve.server.reload, "load_and_warm_up", slow_load)
    with TestClient(create_app(settings_for(bundle_dir, admin_keys=["admin-key"]))) as client:
        answers: dict[str, Any] = {}
        first = threading.Thread(target=lambda: answers.update(first=client.post("/v1/admin/reload", headers=ADMIN)))
        first.start()
        assert entered.wait(timeout=30)
        second = client.post("/v1/admin/reload", headers=ADMIN)
        assert second.status_code == 409 and second.json()["error"]["code"] == "reload_in_progress"
        release.set()
        first.join(timeout=30)
        assert answers["first"].status_code == 200


def test_reload_before_ready_is_503(bundle_dir: Path, settings_for: Callable[..., Any]) -> None:
    client = TestClient(create_app(settings_for(bundle_dir, admin_keys=["admin-key"])))  # lifespan not run
    response = client.post("/v1/admin/reload", headers=ADMIN)
    assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"


def test_sighup_reloads_a_running_server_and_refuses_a_broken_bundle(
    bundle_dir: Path, bundle_factory: Callable[..., Path], tmp_path: Path
) -> None:
    served = Path(shutil.copytree(bundle_dir, tmp_path / "served"))
    renamed = bundle_factory(name="renamed-bundle")
    with ServeProcess(served, tmp_path / "serve.log") as server:
        server.wait_ready()
        assert httpx.get(f"{server.url}/v1/models").json()["default"] == "test-bundle"
        shutil.rmtree(served)
        shutil.copytree(renamed, served)
        server.process.send_signal(signal.SIGHUP)
        server.wait_for_log("reload (SIGHUP) done")
        assert httpx.get(f"{server.url}/v1/models").json()["default"] == "renamed-bundle"
        (served / "flow.onnx").write_bytes(b"not an onnx model")
        server.process.send_signal(signal.SIGHUP)
        log = server.wait_for_log("SIGHUP reload not done")
        assert "altered file 'flow.onnx'" in log
        assert httpx.get(f"{server.url}/v1/models").json()["default"] == "renamed-bundle"
        score = httpx.post(f"{server.url}/v1/score", json={"instances": [np.zeros((28, 28), int).tolist()]})
        assert score.status_code == 200
        assert server.stop() == 0


def test_reload_keeps_the_extra_bundles_and_refuses_a_name_clash(
    bundle_dir: Path, second_bundle: Path, bundle_factory: Callable[..., Path], settings_for: Callable[..., Any]
) -> None:
    extra = bundle_factory(name="extra-bundle")
    settings = settings_for(bundle_dir, extra_bundles=[extra], admin_keys=["admin-key"])
    with TestClient(create_app(settings)) as client:
        reloaded = client.post("/v1/admin/reload", json={"bundle": str(second_bundle)}, headers=ADMIN)
        assert reloaded.status_code == 200
        assert reloaded.json()["default"] == "test-bundle"
        assert {model["name"]: model["bundle"] for model in reloaded.json()["models"]} == {
            "test-bundle": str(second_bundle),
            "extra-bundle": str(extra),
        }
        body = {"instances": [np.zeros((28, 28), int).tolist()]}
        assert client.post("/v1/models/extra-bundle/score", json=body).status_code == 200
        clash = client.post("/v1/admin/reload", json={"bundle": str(bundle_factory(name="extra-bundle"))}, headers=ADMIN)
        assert clash.status_code == 422 and "two bundles are named 'extra-bundle'" in clash.json()["error"]["message"]
        assert client.get("/v1/models").json()["default"] == "test-bundle"
