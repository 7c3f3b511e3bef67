"""The one HTTP load driver of the benchmarks: request bodies, a loopback server subprocess, and concurrent
keep-alive clients sending prebuilt score requests (used by `oodserve bench` and `bench --load`)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def request_bodies(images: np.ndarray, body: str, per_request: int = 1) -> tuple[list[bytes], str]:
    """Bodies of `per_request` consecutive images each (images (N, *shape) uint8) and their content type."""
    groups = [images[start : start + per_request] for start in range(0, len(images) - per_request + 1, per_request)]
    if body == "json":
        return [orjson.dumps({"instances": group.tolist()}) for group in groups], "application/json"
    if body == "npy":
        encoded = []
        for group in groups:
            buffer = io.BytesIO()
            np.save(buffer, np.ascontiguousarray(group), allow_pickle=False)
            encoded.append(buffer.getvalue())
        return encoded, "application/x-npy"
    raise ValueError(f"unknown body kind {body!r}; use json or npy")


def wait_until_ok(process: subprocess.Popen[bytes], url: str, timeout: float, what: str) -> None:
    """Poll `url` until it answers 200; RuntimeError naming `what` when `process` exits first or `timeout` passes."""
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready within {timeout:g} s")
        time.sleep(0.1)


class ServerProcess:
    """`python -m oodserve.cli serve` on 127.0.0.1 with the given OODSERVE_* overrides; stopped on exit."""

    def __init__(self, bundle: Path, env: dict[str, str], log: Path | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._log = log.open("a") if log is not None else None
        output = self._log if self._log is not None else subprocess.DEVNULL
        command = [
            sys.executable,
            "-m",
            "oodserve.cli",
            "serve",
            "--bundle",
            str(bundle),
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.process = subprocess.Popen(command, env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120.0) -> None:
        wait_until_ok(self.process, f"{self.url}/readyz", timeout, "the benchmark server")

    def __enter__(self) -> ServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        if self._log is not None:
            self._log.close()


@dataclass
class Outcomes:
    """What the sent requests got back: latency (seconds) and status of each answered request, and the
    transport errors by exception name."""

    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    transport_errors: Counter[str] = field(default_factory=Counter)
    stopped_at_time_bound: bool = False

    @property
    def not_ok(self) -> int:
        """Requests without a 200: other statuses and transport errors."""
        return sum(count for status, count in self.statuses.items() if status != 200) + sum(self.transport_errors.values())


async def send_requests(
    url: str,
    bodies: list[bytes],
    content_type: str,
    concurrency: int,
    requests: int,
    api_key: str | None = None,
    max_seconds: float | None = None,
    outcomes: Outcomes | None = None,
    path: str = "/v1/score",
    extra_headers: dict[str, str] | None = None,
) -> Outcomes:
    """`requests` POSTs of the bodies (in turn) to url + path from `concurrency` workers; stops early after
    `max_seconds` when given. Fills and returns `outcomes` (a fresh one by default), live as answers come.

    Each worker has its own aiohttp session holding one keep-alive connection. The client shares the
    cores with the server it measures, so its cost per request is the server's loss: aiohttp on uvloop
    (`run_client`) spends about 0.2 ms of CPU per single-image request here, httpx 0.8-1.4 ms (more as
    concurrency grows), which made the client the largest consumer of CPU in the single-image rows.
    """
    import aiohttp

    result = outcomes if outcomes is not None else Outcomes()
    headers = {"content-type": content_type, **(extra_headers or {})}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    target = f"{url}{path}"
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=30.0, sock_read=120.0)
    workers = min(concurrency, max(requests, 1))
    async with contextlib.AsyncExitStack() as stack:
        sessions = [
            await stack.enter_async_context(
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1), timeout=timeout, auto_decompress=False)
            )
            for _ in range(workers)
        ]

        async def post(worker: int, index: int) -> int:
            async with sessions[worker].post(target, data=bodies[index % len(bodies)], headers=headers) as response:
                await response.read()
                return response.status

        def transport_error(error: Exception) -> str | None:
            return type(error).__name__ if isinstance(error, aiohttp.ClientError | TimeoutError) else None

        return await drive_workers(result, workers, requests, max_seconds, post, transport_error)


async def drive_workers(
    result: Outcomes,
    workers: int,
    requests: int,
    max_seconds: float | None,
    send: Callable[[int, int], Awaitable[int]],
    transport_error: Callable[[Exception], str | None],
) -> Outcomes:
    """The load loop of every driver: `requests` calls of send(worker, index) (index 0, 1, ... handed out in
    order) from `workers` coroutines, each timed and its status counted in `result`; an exception that
    transport_error names counts as a transport error of that name (any other propagates). Stops handing
    out indices after `max_seconds` when given."""
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    next_index = 0

    async def worker(number: int) -> None:
        nonlocal next_index
        while next_index < requests:
            if deadline is not None and time.monotonic() > deadline:
                result.stopped_at_time_bound = True
                return
            index = next_index
            next_index += 1
            started = time.perf_counter()
            try:
                status = await send(number, index)
            except Exception as error:
                name = transport_error(error)
                if name is None:
                    raise
                result.transport_errors[name] += 1
                continue
            result.latencies.append(time.perf_counter() - started)
            result.statuses[status] += 1

    await asyncio.gather(*(worker(number) for number in range(workers)))
    return result


def run_client(coroutine: Coroutine[Any, Any, T]) -> T:
    """Run a load client's coroutine to completion on uvloop (asyncio's own loop where uvloop is missing):
    the event loop is a large part of a small request's client cost."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop comes with uvicorn[standard] on Linux and macOS
        return asyncio.run(coroutine)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coroutine)
