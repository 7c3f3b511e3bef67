"""The lean route for POST score/infer answers exactly what FastAPI's routes answer: the same bodies, statuses,
headers that matter and error envelopes for every body type, key and failure; the same request metrics labels.
Every other request, and other methods on these paths, still go through FastAPI."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

import oodserve.server.v2.routes as v2_routes
from oodserve.engine import EngineRegistry, load_registry
from oodserve.runtime.sessions import RuntimeOptions
from oodserve.server.app import create_app
from oodserve.server.hot_path import hot_routes, route_path

MODEL = "test-bundle"


@pytest.fixture(scope="module")
def registry(bundle_dir: Path) -> EngineRegistry:
    return load_registry([bundle_dir], RuntimeOptions(intra_op_threads=1, inter_op_threads=1))


@pytest.fixture(scope="module")
def pair(registry: EngineRegistry, settings_for: Callable[..., Any], bundle_dir: Path) -> Iterator[tuple[TestClient, TestClient]]:
    """(lean, FastAPI-only) clients on the same engines and settings, one API key configured."""
    settings = {"api_keys": ["k1"], "drift": False}
    with (
        TestClient(create_app(settings_for(bundle_dir, lean_routes=True, **settings), registry)) as lean,
        TestClient(create_app(settings_for(bundle_dir, lean_routes=False, **settings), registry)) as plain,
    ):
        yield lean, plain


KEY = {"authorization": "Bearer k1"}


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def v2_binary(images: np.ndarray) -> tuple[bytes, dict[str, str]]:
    raw = images.astype(np.uint8).tobytes()
    header = orjson.dumps({
        "inputs": [{"name": "x", "shape": list(images.shape), "datatype": "UINT8", "parameters": {"binary_data_size": len(raw)}}],
        "outputs": [{"name": "p_value", "parameters": {"binary_data": True}}, {"name": "is_ood"}],
    })
    return header + raw, {"inference-header-content-length": str(len(header))}


def requests_to_compare(images: np.ndarray) -> list[tuple[str, str, bytes, dict[str, str]]]:
    """(label, path, body, headers) for every hot path and body type, good and bad."""
    one = images[:1]
    tensor = {"name": "x", "shape": [2, 1, 28, 28], "datatype": "UINT8", "data": images[:2].reshape(-1).tolist()}
    v2_json = orjson.dumps({"inputs": [tensor]})
    binary, binary_headers = v2_binary(images[:3])
    json_type = {"content-type": "application/json"}
    return [
        ("v1 json", "/v1/score", orjson.dumps({"instances": images[:2].tolist(), "alpha": 0.2}), json_type),
        ("v1 json named", f"/v1/models/{MODEL}/score", orjson.dumps({"instances": one.tolist()}), json_type),
        ("v1 npy", f"/v1/models/{MODEL}/score?alpha=0.3", npy(images[:4]), {"content-type": "application/x-npy"}),
        ("v1 png", "/v1/score", png(images[0, 0]), {"content-type": "image/png"}),
        ("v2 json", f"/v2/models/{MODEL}/infer", v2_json, json_type),
        ("v2 json version", f"/v2/models/{MODEL}/versions/1.2.3/infer", v2_json, json_type),
        ("v2 binary", f"/v2/models/{MODEL}/infer", binary, binary_headers),
        ("v1 bad json", "/v1/score", b"{", json_type),
        ("v1 wrong shape", "/v1/score", orjson.dumps({"instances": [[1, 2, 3]]}), json_type),
        ("v1 bad media type", "/v1/score", b"x", {"content-type": "text/plain"}),
        ("v1 alpha below resolution", "/v1/score", orjson.dumps({"instances": one.tolist(), "alpha": 1e-9}), json_type),
        ("v1 too many", "/v1/score", orjson.dumps({"instances": [images[0].tolist()] * 300}), json_type),
        ("v1 unknown model", "/v1/models/nope/score", orjson.dumps({"instances": one.tolist()}), json_type),
        ("v1 bad stream", "/v1/score", orjson.dumps({"instances": one.tolist()}), {**json_type, "x-ood-stream": "bad stream!"}),
        ("v2 unknown model", "/v2/models/nope/infer", v2_json, json_type),
        ("v2 unknown version", f"/v2/models/{MODEL}/versions/9/infer", v2_json, json_type),
        ("v2 unknown version as a query", f"/v2/models/{MODEL}/infer?version=9", v2_json, json_type),
        ("v2 version as a query", f"/v2/models/{MODEL}/infer?version=1.2.3", v2_json, json_type),
        ("v2 bad json", f"/v2/models/{MODEL}/infer", b"[", json_type),
        ("v2 gzip", f"/v2/models/{MODEL}/infer", v2_json, {**json_type, "content-encoding": "gzip"}),
        ("v2 bad datatype", f"/v2/models/{MODEL}/infer", v2_json.replace(b"UINT8", b"INT8"), json_type),
    ]


@pytest.mark.parametrize("index", range(21))
def test_lean_route_answers_what_fastapi_answers(pair: tuple[TestClient, TestClient], make_images: Any, index: int) -> None:
    lean, plain = pair
    images = make_images(4, 41)
    label, path, body, headers = requests_to_compare(images)[index]
    for key in ({}, {"authorization": "Bearer wrong"}, KEY):
        answers = [client.post(path, content=body, headers={**headers, **key}) for client in (lean, plain)]
        fast, slow = answers
        assert fast.status_code == slow.status_code, (label, key, fast.text, slow.text)
        assert fast.content == slow.content, (label, key)
        for header in ("content-type", "www-authenticate", "retry-after", "inference-header-content-length"):
            assert fast.headers.get(header) == slow.headers.get(header), (label, header)
    assert fast.status_code != 500


def test_the_request_list_covers_every_parametrised_case(make_images: Any) -> None:
    assert len(requests_to_compare(make_images(4, 41))) == 21


def test_other_methods_and_paths_still_reach_fastapi(pair: tuple[TestClient, TestClient]) -> None:
    lean, plain = pair
    cases = [("GET", "/v1/score"), ("PUT", f"/v2/models/{MODEL}/infer"), ("POST", "/v1/scores"), ("POST", "/v2/models/a/b/infer")]
    for method, path in cases:
        fast, slow = (client.request(method, path, headers=KEY) for client in (lean, plain))
        assert (fast.status_code, fast.content) == (slow.status_code, slow.content), (method, path)
        assert fast.status_code in (404, 405)


def test_lean_requests_are_counted_under_their_route_template(
    registry: EngineRegistry, settings_for: Callable[..., Any], bundle_dir: Path, make_images: Any
) -> None:
    with TestClient(create_app(settings_for(bundle_dir), registry)) as client:
        body = {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": make_images(1, 3).reshape(-1).tolist()}]}
        assert client.post(f"/v2/models/{MODEL}/infer", json=body).status_code == 200
        assert client.post("/v2/models/nope/infer", json=body).status_code == 404
        assert client.post(f"/v1/models/{MODEL}/score", json={"instances": make_images(1, 4).tolist()}).status_code == 200
        text = client.get("/metrics").text
    counts = {
        (sample.labels["endpoint"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "oodserve_http_requests_total" and sample.labels["method"] == "POST"
    }
    assert counts[("/v2/models/{name}/infer", "200")] == 1
    assert counts[("/v2/models/{name}/infer", "404")] == 1
    assert counts[("/v1/models/{name}/score", "200")] == 1


def test_an_unexpected_failure_is_a_logged_500_in_the_route_envelope(
    registry: EngineRegistry, settings_for: Callable[..., Any], bundle_dir: Path, make_images: Any, monkeypatch: pytest.MonkeyPatch
) -> None:

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(v2_routes, "parse_infer_request", broken)
    with TestClient(create_app(settings_for(bundle_dir), registry), raise_server_exceptions=False) as client:
        body = {"inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": make_images(1, 3).reshape(-1).tolist()}]}
        answer = client.post(f"/v2/models/{MODEL}/infer", json=body)
    assert answer.status_code == 500
    assert answer.json() == {"error": "the server failed to handle this request; see the service log"}


@pytest.mark.parametrize(
    "authorization",
    ["Bearer k1", "Bearer  k1", "bearer k1", "Bearer", "Bearer   ", "Basic k1", "Bearer k1 ", "Bearerk1", "Bearer k2", ""],
)
def test_the_key_is_read_as_fastapis_httpbearer_reads_it(pair: tuple[TestClient, TestClient], make_images: Any, authorization: str) -> None:
    lean, plain = pair
    body = orjson.dumps({"instances": make_images(1, 5).tolist()})
    headers = {"content-type": "application/json", "authorization": authorization}
    fast, slow = (client.post("/v1/score", content=body, headers=headers) for client in (lean, plain))
    assert (fast.status_code, fast.content, fast.headers.get("www-authenticate")) == (
        slow.status_code,
        slow.content,
        slow.headers.get("www-authenticate"),
    )


def test_a_body_past_the_limit_is_413_from_the_limits_middleware_without_an_error_log(
    registry: EngineRegistry, settings_for: Callable[..., Any], bundle_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A chunked body that passes OODSERVE_MAX_BODY_BYTES while the lean route reads it is the limits middleware's 413,
    as on a FastAPI route: not a crash logged with a traceback."""

    def chunks() -> Iterator[bytes]:
        yield b'{"instances": ['
        for _ in range(64):
            yield b"[" + b"0," * 4000 + b"0],"

    with TestClient(create_app(settings_for(bundle_dir, max_body_bytes=100_000), registry)) as client:
        for path in ("/v1/score", f"/v2/models/{MODEL}/infer"):
            answer = client.post(path, content=chunks(), headers={"content-type": "application/json"})
            assert answer.status_code == 413, answer.text
    assert not [record for record in caplog.records if record.levelname == "ERROR"]


def test_a_lean_path_without_a_router_route_is_refused() -> None:
    async def handler(request: Any, engine: Any) -> Any:
        raise AssertionError

    with pytest.raises(ValueError, match="no POST route"):
        hot_routes([], {"/v9/x": handler})


def test_route_path_drops_the_root_path_as_starlette_does() -> None:
    assert route_path({"path": "/api/v1/score", "root_path": "/api"}) == "/v1/score"
    assert route_path({"path": "/v1/score", "root_path": ""}) == "/v1/score"
    assert route_path({"path": "/apix/v1/score", "root_path": "/api"}) == "/apix/v1/score"
    assert route_path({"path": "/v1/score"}) == "/v1/score"
