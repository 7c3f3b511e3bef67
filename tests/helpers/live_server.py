"""Real HTTP servers for the reliability tests: uvicorn in a thread of the test process, or `oodserve serve`
as a subprocess (for signals), both on 127.0.0.1 with a free port."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from oodserve.bench.http_driver import free_port

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def uvicorn_in_thread(app: Any, **config: Any) -> Iterator[str]:
    """Serve `app` with uvicorn in a daemon thread (lifespan run); yields the base URL, stops it on exit."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **config))
    thread = threading.Thread(target=server.run, name="uvicorn-test-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive(), "uvicorn stopped before it was ready"
        assert time.monotonic() < deadline, "uvicorn did not start within 60 s"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


class ServeProcess:
    """`python -m oodserve.cli serve` in a subprocess with its log in a file."""

    def __init__(self, bundle: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("w")
        command = [sys.executable, "-m", "oodserve.cli", "serve", "--bundle", str(bundle), "--port", str(self.port)]
        environment = {**os.environ, "OODSERVE_INTRA_OP_THREADS": "1", "OODSERVE_INTER_OP_THREADS": "1", **(env or {})}
        self.process = subprocess.Popen(
            command, cwd=REPOSITORY_ROOT, stdout=self._log, stderr=subprocess.STDOUT, env=environment
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.process.poll() is None, self.log()
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.1)

    def wait_for_log(self, fragment: str, timeout: float = 30.0) -> str:
        deadline = time.monotonic() + timeout
        while fragment not in (text := self.log()):
            assert time.monotonic() < deadline, f"{fragment!r} not logged within {timeout} s:\n{text}"
            time.sleep(0.1)
        return text

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.terminate()
        try:
            return self.process.wait(timeout=30)
        finally:
            self._log.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self._log.close()
