"""Three `oodserve serve` processes sharing their drift streams through a real redis-server: a 10% MNIST mix spread
over the replicas is detected by the one shared stream; kill -9 of a replica loses none of the evidence; the store
restarting (with its append-only file, then without it) and a store outage under load (5 s; 30 s with
OODSERVE_TEST_STORE_OUTAGE_SECONDS=30) fail no scoring request, drift says `unavailable` meanwhile, and the streams
continue (or restart afresh when the store lost them).

The null false-alarm rate over many replays is tested at the store level (test_redis_store.py) and measured at
scale by benchmarks/drift_store.py."""

from __future__ import annotations

import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from oodserve.datasets import DEFAULT_FASHION_MNIST_DIR, load_images
from tests.helpers.live_server import REPOSITORY_ROOT, ServeProcess
from tests.helpers.redis_server import RedisServer, server_binary

BUNDLE = REPOSITORY_ROOT / "models" / "bundles" / "fashion-mnist"
MNIST = REPOSITORY_ROOT.parent / "shared" / "data" / "mnist"
MODEL = "fashion-mnist"
OUTAGE_SECONDS = float(os.environ.get("OODSERVE_TEST_STORE_OUTAGE_SECONDS", "5"))
"""How long the store stays down under load (5 s in CI; the issue's 30 s: OODSERVE_TEST_STORE_OUTAGE_SECONDS=30)."""

pytestmark = [
    pytest.mark.skipif(server_binary() is None, reason="no redis-server installed (make test installs it)"),
    pytest.mark.skipif(not DEFAULT_FASHION_MNIST_DIR.exists() or not MNIST.exists(), reason="Fashion-MNIST or MNIST files missing"),
    pytest.mark.skipif(not (BUNDLE / "manifest.json").exists(), reason="the fashion-mnist bundle is not built"),
    pytest.mark.slow,
]


def npy(images: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, images[:, None].astype(np.float32))
    return buffer.getvalue()


@dataclass
class Deployment:
    store: RedisServer
    replicas: list[ServeProcess]
    clients: list[httpx.Client] = field(default_factory=list)
    turn: int = 0

    def live(self) -> list[int]:
        return [index for index, replica in enumerate(self.replicas) if replica.process.poll() is None]

    def score(self, images: np.ndarray, stream: str, replica: int | None = None) -> int:
        """Score on the given replica, else the next live one round-robin; returns the HTTP status."""
        if replica is None:
            live = self.live()
            replica = live[self.turn % len(live)]
            self.turn += 1
        response = self.clients[replica].post(f"/v1/models/{MODEL}/score", content=npy(images),
                                              headers={"content-type": "application/x-npy", "x-ood-stream": stream})
        return response.status_code

    def drift(self, replica: int | None = None) -> dict[str, Any]:
        index = self.live()[0] if replica is None else replica
        response = self.clients[index].get(f"/v1/models/{MODEL}/drift")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def stream(self, name: str) -> dict[str, Any] | None:
        return next((stream for stream in self.drift()["streams"] if stream["stream"] == name), None)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not reached within {timeout} s: {what}"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def images() -> dict[str, np.ndarray]:
    return {"clean": load_images(DEFAULT_FASHION_MNIST_DIR, "t10k").images, "mnist": load_images(MNIST, "t10k").images}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    directory = tmp_path_factory.mktemp("drift-replicas")
    store = RedisServer(directory / "store", appendonly=True).start()
    environment = {"OODSERVE_DRIFT_STORE": store.url, "OODSERVE_INFERENCE_THREADS": "1", "OODSERVE_CONSOLE": "false"}
    replicas = [ServeProcess(BUNDLE, directory / f"replica-{index}.log", env=environment) for index in range(3)]
    deployment = Deployment(store, replicas)
    try:
        for replica in replicas:
            replica.wait_ready(timeout=180)
        deployment.clients = [httpx.Client(base_url=replica.url, timeout=30) for replica in replicas]
        yield deployment
    finally:
        for client in deployment.clients:
            client.close()
        for replica in replicas:
            replica.stop() if replica.process.poll() is None else None
        store.kill()


def test_a_ten_percent_mnist_mix_spread_over_three_replicas_alarms_on_the_shared_stream(
    deployment: Deployment, images: dict[str, np.ndarray]
) -> None:
    rng = np.random.default_rng(0)
    sent = 0
    for _ in range(200):  # up to 2,000 inputs; one process detects this mix after a median of about 400
        batch = np.where(rng.random(10)[:, None, None] < 0.1, images["mnist"][rng.integers(0, 10_000, 10)],
                         images["clean"][rng.integers(0, 10_000, 10)])
        assert deployment.score(batch, "mix") == 200
        sent += 10
        if sent % 200 == 0:
            stream = deployment.stream("mix")
            if stream is not None and stream["alarm"]:
                break
    wait_for(lambda: (deployment.stream("mix") or {}).get("inputs_since_reset") == sent, "every input of the mix in the store")
    stream = deployment.stream("mix")
    assert stream is not None and stream["alarm"] and stream["log10_martingale_max"] >= 2.0, stream


def test_kill_9_of_a_replica_mid_stream_keeps_the_count_and_the_martingale(
    deployment: Deployment, images: dict[str, np.ndarray]
) -> None:
    rng = np.random.default_rng(1)
    for _ in range(30):
        assert deployment.score(images["clean"][rng.integers(0, 10_000, 10)], "survivor") == 200
    wait_for(lambda: (deployment.stream("survivor") or {}).get("inputs_since_reset") == 300, "300 inputs in the store")
    before = deployment.stream("survivor")
    deployment.replicas[0].process.kill()
    deployment.replicas[0].process.wait(timeout=10)
    assert deployment.stream("survivor") == before  # read by another replica: nothing lost
    for _ in range(20):
        assert deployment.score(images["clean"][rng.integers(0, 10_000, 10)], "survivor") == 200
    wait_for(lambda: (deployment.stream("survivor") or {}).get("inputs_since_reset") == 500, "the stream continuing at 300")
    after = deployment.stream("survivor")
    assert after is not None and before is not None and after["since"] == before["since"]
    assert after["log10_martingale"] != before["log10_martingale"]  # the same martingale, 200 inputs further on


class Load:
    """Scoring requests round-robin over the live replicas from a thread until stopped; counts every failure."""

    def __init__(self, deployment: Deployment, images: np.ndarray) -> None:
        self.deployment, self.images = deployment, images
        self.sent = self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        rng = np.random.default_rng(2)
        live = self.deployment.live()
        clients = [httpx.Client(base_url=self.deployment.replicas[index].url, timeout=30) for index in live]
        try:
            while not self._stop.is_set():
                body = npy(self.images[rng.integers(0, 10_000, 8)])
                try:
                    status = clients[self.sent % len(clients)].post(
                        f"/v1/models/{MODEL}/score", content=body, headers={"content-type": "application/x-npy", "x-ood-stream": "load"}
                    ).status_code
                except httpx.TransportError:
                    status = 0
                self.sent += 1
                self.failed += status != 200
        finally:
            for client in clients:
                client.close()

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def store_up_metric(deployment: Deployment) -> float:
    text = deployment.clients[deployment.live()[0]].get("/metrics").text
    line = next(line for line in text.splitlines() if line.startswith("oodserve_drift_store_up{"))
    return float(line.rsplit(" ", 1)[1])


def test_store_restart_and_outage_under_load_fail_no_request(deployment: Deployment, images: dict[str, np.ndarray]) -> None:
    survivor = deployment.stream("survivor")
    assert survivor is not None
    with Load(deployment, images["clean"]) as load:
        wait_for(lambda: load.sent >= 20, "load running")
        deployment.store.stop()  # a restart with the append-only file: every acknowledged write comes back
        deployment.store.start()
        wait_for(lambda: load.sent >= 60, "load after the store restart")
        deployment.store.kill()  # OUTAGE_SECONDS of outage
        wait_for(lambda: deployment.drift()["store"]["status"] == "unavailable", "drift reporting the store unavailable")
        assert deployment.drift()["streams"] == [] and store_up_metric(deployment) == 0.0
        sent_at_outage = load.sent
        time.sleep(OUTAGE_SECONDS)
        sent_during_outage = load.sent - sent_at_outage
        assert sent_during_outage > 0  # scoring went on meanwhile
        deployment.store.start()
        wait_for(lambda: all(deployment.drift(index)["store"]["status"] == "ok" for index in deployment.live()), "store back")
    assert load.failed == 0 and load.sent > 60
    print(f"store restart and {OUTAGE_SECONDS:g} s outage under load: {load.sent} requests of 8 images, {sent_during_outage} during "
          f"the outage, {load.failed} failed")
    wait_for(lambda: (deployment.stream("load") or {}).get("inputs_since_reset") == 8 * load.sent, "every held input applied")
    assert deployment.stream("survivor") == survivor and store_up_metric(deployment) == 1.0


def test_a_store_that_lost_its_data_restarts_the_streams_and_fails_no_request(
    deployment: Deployment, images: dict[str, np.ndarray], tmp_path: Path
) -> None:
    deployment.store.kill()
    deployment.store.directory, deployment.store.appendonly = tmp_path / "empty-store", False  # same port, nothing persisted
    deployment.store.directory.mkdir()
    deployment.store.start()
    with Load(deployment, images["clean"]) as load:
        wait_for(lambda: load.sent >= 30, "load after the store came back empty")
    assert load.failed == 0
    wait_for(lambda: (deployment.stream("load") or {}).get("inputs_since_reset", 0) > 0, "the load stream started afresh")
    stream = deployment.stream("load")
    assert stream is not None and stream["inputs_since_reset"] <= 8 * load.sent
    assert deployment.stream("survivor") is None  # its evidence was in the lost data
