"""Request limits: 413 before the body is read (declared or chunked), 504 past the request timeout, the JSON
nesting limit, and defaults sized for a 2-core machine."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request
from starlette.responses import JSONResponse

from oodserve.config import Settings
from oodserve.server.app import create_app
from oodserve.server.middleware.limits import RequestLimitsMiddleware, json_nesting_depth
from oodserve.server.state import app_state
from tests.helpers.live_server import uvicorn_in_thread

ZERO_IMAGE = np.zeros((28, 28), int).tolist()


def reference_depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((reference_depth(item) for item in value), default=0)
    if isinstance(value, dict):
        return 1 + max((reference_depth(item) for item in value.values()), default=0)
    return 0


tricky_text = st.text(alphabet=st.sampled_from(list('ab[]{}"\\/:, \n\t\u00e9\u2028')), max_size=12)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | tricky_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(tricky_text, children, max_size=4),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(value=json_values, ensure_ascii=st.booleans(), indent=st.sampled_from([None, 2]))
def test_nesting_depth_of_the_raw_bytes_equals_the_parsed_depth(value: Any, ensure_ascii: bool, indent: int | None) -> None:
    text = json.dumps(value, ensure_ascii=ensure_ascii, indent=indent)
    assert json_nesting_depth(text.encode("utf-8")) == reference_depth(value)


def test_nesting_depth_ignores_brackets_in_strings() -> None:
    assert json_nesting_depth(b'{"a": "[[[{{{", "b": [1, [2]]}') == 3
    assert json_nesting_depth(b'["\\"[[[", "\\\\", [[]]]') == 3
    assert json_nesting_depth(b"") == 0 and json_nesting_depth(b"17") == 0


# --- the middleware on its own (raw ASGI) ---------------------------------------------------------


async def swallowing_app(scope: Any, receive: Any, send: Any) -> None:
    """Reads the whole body the way FastAPI does and turns any failure into a 400 of its own."""
    request = Request(scope, receive)
    try:
        body = await request.body()
    except Exception:  # noqa: BLE001 - like FastAPI's body parsing
        await JSONResponse({"detail": "There was an error parsing the body"}, status_code=400)(scope, receive, send)
        return
    await JSONResponse({"bytes": len(body)})(scope, receive, send)


def run_asgi(app: Any, headers: list[tuple[bytes, bytes]], chunks: list[bytes], path: str = "/v1/score") -> tuple[int, dict[str, Any], int]:
    """Drive one request through `app`; returns (status, JSON body, number of receive() calls)."""
    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, "query_string": b""}
    received = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal received
        received += 1
        if received > len(chunks):
            await asyncio.sleep(3600)
        return {"type": "http.request", "body": chunks[received - 1], "more_body": received < len(chunks)}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    status = next(message["status"] for message in sent if message["type"] == "http.response.start")
    body = b"".join(message.get("body", b"") for message in sent if message["type"] == "http.response.body")
    return status, json.loads(body), received


def test_declared_length_over_the_limit_is_413_without_reading_the_body() -> None:
    app = RequestLimitsMiddleware(swallowing_app, max_body_bytes=1000, timeout_seconds=5)
    status, body, received = run_asgi(app, [(b"content-length", b"1001")], [b"x" * 1001])
    assert status == 413 and body["error"]["code"] == "body_too_large" and received == 0
    status, body, received = run_asgi(app, [(b"content-length", b"ten")], [b"x"])
    assert status == 400 and received == 0


def test_chunked_body_over_the_limit_is_413_after_the_first_chunk_past_it() -> None:
    app = RequestLimitsMiddleware(swallowing_app, max_body_bytes=1000, timeout_seconds=5)
    chunks = [b"x" * 400] * 100  # 40 kB sent without Content-Length
    status, body, received = run_asgi(app, [], chunks)
    assert status == 413 and body["error"]["code"] == "body_too_large"
    assert received == 3  # 400 + 400 + 400 > 1000: the other 97 chunks are never read
    status, body, _ = run_asgi(app, [], [b"x" * 500, b"x" * 500])
    assert status == 200 and body == {"bytes": 1000}


def test_slow_request_is_answered_504_without_waiting_for_it() -> None:
    finished = threading.Event()

    async def slow_app(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(30)
        finished.set()

    app = RequestLimitsMiddleware(slow_app, max_body_bytes=1000, timeout_seconds=0.05)
    status, body, _ = run_asgi(app, [(b"content-length", b"0")], [b""])
    assert status == 504 and body["error"]["code"] == "timeout" and not finished.is_set()


def test_admin_paths_have_no_timeout() -> None:
    async def takes_a_moment(scope: Any, receive: Any, send: Any) -> None:
        await asyncio.sleep(0.2)
        await JSONResponse({"done": True})(scope, receive, send)

    app = RequestLimitsMiddleware(takes_a_moment, max_body_bytes=1000, timeout_seconds=0.05)
    assert run_asgi(app, [], [b""], path="/v1/admin/reload")[:2] == (200, {"done": True})
    assert run_asgi(app, [], [b""], path="/v1/score")[0] == 504


# --- through the service ----------------------------------------------------------------------------


def test_json_nested_deeper_than_the_limit_is_400(bundle_dir: Path, settings_for: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings_for(bundle_dir, max_json_depth=5))) as client:
        assert client.post("/v1/score", json={"instances": [[ZERO_IMAGE]]}).status_code == 200  # depth 5
        response = client.post("/v1/score", json={"instances": [[[ZERO_IMAGE]]]})
        assert response.status_code == 400
        assert "nesting depth is 6; the limit is 5" in response.json()["error"]["message"]


def test_chunked_score_body_over_the_limit_is_413(bundle_dir: Path, settings_for: Callable[..., Settings]) -> None:
    def chunks() -> Any:
        for _ in range(50):
            yield b" " * 20_000  # 1 MB of whitespace, no Content-Length

    with TestClient(create_app(settings_for(bundle_dir, max_body_bytes=100_000))) as client:
        response = client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_score_past_the_request_timeout_is_504(bundle_dir: Path, settings_for: Callable[..., Settings]) -> None:
    with TestClient(create_app(settings_for(bundle_dir, request_timeout_seconds=0.3))) as client:
        runner = app_state(client.app).registry.default.runner
        release = threading.Event()
        original_run = runner.run

        def stuck_run(*args: Any, **kwargs: Any) -> Any:
            assert release.wait(timeout=30)
            return original_run(*args, **kwargs)

        runner.run = stuck_run
        try:
            response = client.post("/v1/score", json={"instances": [ZERO_IMAGE]})
            assert not release.is_set()
            assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        finally:
            release.set()
        runner.run = original_run
        assert client.post("/v1/score", json={"instances": [ZERO_IMAGE]}).status_code == 200


def http_exchange(port: int, head: bytes, body: bytes) -> bytes:
    """Send raw bytes to 127.0.0.1:port and read until the server closes or 5 s pass."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(head + body)
        answer = b""
        try:
            while chunk := connection.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return answer


def test_real_server_answers_413_before_the_body_is_sent(bundle_dir: Path, settings_for: Callable[..., Settings]) -> None:
    """Over TCP: a huge Content-Length with no body, and an unterminated chunked body, both get 413 at once."""
    with uvicorn_in_thread(create_app(settings_for(bundle_dir, max_body_bytes=100_000))) as base_url:
        port = int(base_url.rsplit(":", 1)[1])
        declared = http_exchange(
            port, b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n", b""
        )
        assert declared.startswith(b"HTTP/1.1 413"), declared[:200]
        chunk = b" " * 150_000
        chunked = http_exchange(
            port,
            b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n",
            f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n",  # no terminating 0-chunk: the body never ends
        )
        assert chunked.startswith(b"HTTP/1.1 413"), chunked[:200]
        assert b"body_too_large" in chunked


def test_defaults_protect_a_two_core_machine() -> None:
    defaults = Settings()
    assert defaults.max_body_bytes <= 8 * 1024 * 1024
    assert defaults.max_batch_instances <= 256
    assert defaults.max_json_depth <= 32
    assert defaults.request_timeout_seconds <= 30
    assert defaults.max_concurrent_connections <= 128
    assert defaults.api_keys == [] and defaults.admin_keys == [] and not defaults.protect_metrics


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_non_finite_values_are_422(client: TestClient, literal: bytes) -> None:
    row = b"[" + b", ".join([literal] + [b"0"] * 27) + b"]"
    body = b'{"instances": [[' + b", ".join([row] + [b"[" + b", ".join([b"0"] * 28) + b"]"] * 27) + b"]]}"
    response = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
