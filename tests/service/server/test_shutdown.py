"""Graceful shutdown of `oodserve serve`: on SIGTERM it stops accepting connections, finishes every in-flight
request (none is cut) and exits with status 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np

from tests.helpers.live_server import ServeProcess

SLOW_INSTANCES = 2048  # ~1 s of validation and scoring each on a busy 2-core machine
IN_FLIGHT = 4


def server_side_receive_queues(port: int) -> list[int]:
    """Bytes waiting unread in each established server-side TCP connection on 127.0.0.1:port (/proc/net/tcp)."""
    queues = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "01":  # local port, state ESTABLISHED
            queues.append(int(fields[4].split(":")[1], 16))
    return queues


def wait_until_bodies_are_read(port: int, uploads: list[threading.Event], timeout: float = 60.0) -> None:
    """Until every client has sent its whole body and the server has read every byte of each (so all the
    requests are inside the app, not waiting in a socket buffer or the listen backlog)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queues = server_side_receive_queues(port)
        if all(upload.is_set() for upload in uploads) and len(queues) >= len(uploads) and not any(queues):
            return
        time.sleep(0.02)
    raise AssertionError(f"the request bodies were not read within {timeout} s: {server_side_receive_queues(port)}")


def test_sigterm_finishes_in_flight_requests_and_exits_0(bundle_dir: Path, tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (SLOW_INSTANCES, 28, 28))
    body = json.dumps({"instances": images.tolist()}).encode()
    env = {
        "OODSERVE_MAX_BATCH_INSTANCES": str(SLOW_INSTANCES),
        "OODSERVE_MAX_BODY_BYTES": str(4 * len(body)),
        "OODSERVE_REQUEST_TIMEOUT_SECONDS": "120",
        "OODSERVE_BATCH_DEADLINE_SECONDS": "120",
        "OODSERVE_BATCH_QUEUE_CAPACITY": str(IN_FLIGHT * SLOW_INSTANCES),
    }
    with ServeProcess(bundle_dir, tmp_path / "serve.log", env=env) as server:
        server.wait_ready()
        answers: list[tuple[int | str, float]] = []
        lock = threading.Lock()

        uploads = [threading.Event() for _ in range(IN_FLIGHT)]

        def chunks(uploaded: threading.Event) -> Iterator[bytes]:
            for start in range(0, len(body), 1 << 20):
                yield body[start : start + (1 << 20)]
            uploaded.set()

        def slow_request(uploaded: threading.Event) -> None:
            try:
                response = httpx.post(
                    f"{server.url}/v1/score", content=chunks(uploaded), headers={"content-type": "application/json"}, timeout=120
                )
                results = response.json().get("results", [])
                outcome: int | str = response.status_code if len(results) == SLOW_INSTANCES else response.text[:300]
            except (httpx.HTTPError, ValueError) as error:
                outcome = repr(error)
            with lock:
                answers.append((outcome, time.monotonic()))

        clients = [threading.Thread(target=slow_request, args=(uploaded,)) for uploaded in uploads]
        for client in clients:
            client.start()
        wait_until_bodies_are_read(server.port, uploads)  # all four are in flight inside the app
        terminated_at = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        refused_at = None  # when a new connection first failed: the server stopped accepting
        while refused_at is None and time.monotonic() < terminated_at + 30:
            try:
                httpx.get(f"{server.url}/healthz", timeout=2)
                time.sleep(0.05)
            except httpx.TransportError:
                refused_at = time.monotonic()
        for client in clients:
            client.join(timeout=120)
        exit_code = server.process.wait(timeout=60)
        log = server.log()
    assert [outcome for outcome, _ in answers] == [200] * IN_FLIGHT, (answers, log[-3000:])
    finished_after_sigterm = [at for _, at in answers if at > terminated_at]
    assert finished_after_sigterm, "no request was still in flight when SIGTERM was sent"
    assert refused_at is not None and refused_at < max(finished_after_sigterm)  # stopped accepting, still finishing
    assert exit_code == 0, log[-3000:]
    assert "Shutting down" in log and "exiting with status 0" in log


def test_sigterm_on_an_idle_server_exits_0(bundle_dir: Path, tmp_path: Path) -> None:
    with ServeProcess(bundle_dir, tmp_path / "serve.log") as server:
        server.wait_ready()
        with httpx.Client(base_url=server.url) as keep_alive:  # an idle keep-alive connection does not block the exit
            assert keep_alive.get("/healthz").status_code == 200
            assert server.stop() == 0
