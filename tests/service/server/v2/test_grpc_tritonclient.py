"""KServe v2 gRPC against the real `tritonclient[grpc]`: health, metadata, inference on raw and typed tensors
(the same verdicts as the HTTP API), auth, limits, status codes, drift streams and metrics."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest

from oodserve.server.app import create_app
from oodserve.server.state import app_state
from oodserve.server.v2_grpc import messages
from tests.helpers.bundles import make_settings
from tests.helpers.live_server import uvicorn_in_thread

grpcclient = pytest.importorskip("tritonclient.grpc")
from tritonclient.utils import InferenceServerException  # noqa: E402

KEY = "grpc-test-key"
MODEL = "test-bundle"


@dataclass
class Served:
    url: str
    grpc_url: str
    client: Any


@contextmanager
def serve(bundle: Path, **overrides: Any) -> Iterator[Served]:
    app = create_app(make_settings(bundle, grpc_port=0, **overrides))
    with uvicorn_in_thread(app) as url:
        target = f"127.0.0.1:{app_state(app).grpc_port}"
        served = Served(url, target, grpcclient.InferenceServerClient(url=target))
        try:
            yield served
        finally:
            served.client.close()


@pytest.fixture(scope="module")
def server(bundle_dir: Path) -> Iterator[Served]:
    with serve(bundle_dir) as served:
        yield served


def uint8_input(images: np.ndarray) -> Any:
    tensor = grpcclient.InferInput("x", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images.astype(np.uint8))
    return tensor


def status_of(call: Callable[[], Any]) -> tuple[str, str]:
    with pytest.raises(InferenceServerException) as caught:
        call()
    return str(caught.value.status()), caught.value.message()


def test_health_and_metadata(server: Served) -> None:
    client = server.client
    assert client.is_server_live() and client.is_server_ready()
    assert client.get_server_metadata(as_json=True)["name"] == "oodserve"
    assert client.is_model_ready(MODEL) and not client.is_model_ready("no-such-model")
    metadata = client.get_model_metadata(MODEL, as_json=True)
    assert metadata["inputs"] == [{"name": "x", "datatype": "UINT8", "shape": ["-1", "1", "28", "28"]}]
    assert {"is_ood", "p_value", "score"} <= {o["name"] for o in metadata["outputs"]}
    code, _ = status_of(lambda: client.get_model_metadata("no-such-model"))
    assert code == "StatusCode.NOT_FOUND"


def test_infer_matches_the_http_api(server: Served, make_images: Callable[[int, int], np.ndarray]) -> None:
    images = make_images(5, 21)
    http = httpx.post(f"{server.url}/v1/score", json={"instances": images.tolist(), "alpha": 0.2}).json()["results"]
    result = server.client.infer(MODEL, [uint8_input(images)], parameters={"alpha": "0.2"}, request_id="r-1")
    assert result.get_response().id == "r-1" and result.get_response().model_name == MODEL
    np.testing.assert_array_equal(result.as_numpy("is_ood"), [r["is_ood"] for r in http])
    np.testing.assert_allclose(result.as_numpy("p_value"), [r["p_value"] for r in http], rtol=0, atol=1e-12)
    np.testing.assert_allclose(result.as_numpy("score"), [r["score"] for r in http], rtol=1e-9)
    assert result.get_response().parameters["alpha"].double_param == 0.2
    floats = grpcclient.InferInput("x", list(images.shape), "FP32")
    floats.set_data_from_numpy(images.astype(np.float32))
    same = server.client.infer(MODEL, [floats], parameters={"alpha": "0.2"})
    np.testing.assert_array_equal(same.as_numpy("p_value"), result.as_numpy("p_value"))
    chosen = server.client.infer(MODEL, [uint8_input(images)], outputs=[grpcclient.InferRequestedOutput("p_value")])
    assert [o.name for o in chosen.get_response().outputs] == ["p_value"]


def test_typed_contents_are_accepted(server: Served, make_images: Callable[[int, int], np.ndarray]) -> None:
    images = make_images(2, 5)
    request = messages.ModelInferRequest(model_name=MODEL)
    tensor = request.inputs.add(name="x", datatype="UINT8", shape=list(images.shape))
    tensor.contents.uint_contents.extend(images.ravel().tolist())
    with grpc.insecure_channel(server.grpc_url) as channel:
        infer = channel.unary_unary(f"/{messages.SERVICE_NAME}/ModelInfer", request_serializer=messages.ModelInferRequest.SerializeToString,
                                    response_deserializer=messages.ModelInferResponse.FromString)
        response = infer(request)
        assert [o.name for o in response.outputs][:3] == ["is_ood", "p_value", "score"]
        assert np.frombuffer(response.raw_output_contents[1], dtype="<f8").shape == (2,)
        tensor.contents.uint_contents.append(7)
        with pytest.raises(grpc.RpcError) as caught:
            infer(request)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "holds 1568 values" in caught.value.details()


def test_bad_requests_get_status_codes_that_say_why(server: Served, make_images: Callable[[int, int], np.ndarray]) -> None:
    client = server.client
    images = make_images(1, 3)
    wrong_shape = grpcclient.InferInput("x", [1, 1, 27, 28], "UINT8")
    wrong_shape.set_data_from_numpy(np.zeros((1, 1, 27, 28), np.uint8))
    code, message = status_of(lambda: client.infer(MODEL, [wrong_shape]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "shape" in message
    code, message = status_of(lambda: client.infer(MODEL, [uint8_input(images)], parameters={"alpha": "1.5"}))
    assert code == "StatusCode.INVALID_ARGUMENT" and "alpha" in message
    code, message = status_of(lambda: client.infer(MODEL, [uint8_input(images)], parameters={"alpha": "1e-9"}))
    assert code == "StatusCode.INVALID_ARGUMENT" and "alpha_below_resolution" in message
    code, message = status_of(lambda: client.infer(MODEL, [uint8_input(images)], parameters={"beta": 1}))
    assert code == "StatusCode.INVALID_ARGUMENT" and "beta" in message
    code, _ = status_of(lambda: client.infer("no-such-model", [uint8_input(images)]))
    assert code == "StatusCode.NOT_FOUND"
    misnamed = grpcclient.InferInput("input", [1, 1, 28, 28], "UINT8")
    misnamed.set_data_from_numpy(images.astype(np.uint8))
    code, message = status_of(lambda: client.infer(MODEL, [misnamed]))
    assert code == "StatusCode.INVALID_ARGUMENT" and "'x'" in message
    too_many = np.zeros((17, 1, 28, 28), np.uint8)  # make_settings: at most 16 per request
    code, _ = status_of(lambda: client.infer(MODEL, [uint8_input(too_many)]))
    assert code == "StatusCode.RESOURCE_EXHAUSTED"
    oversized = np.zeros((600, 1, 28, 28), np.uint8)  # 470 kB above the 400 kB body limit
    code, _ = status_of(lambda: client.infer(MODEL, [uint8_input(oversized)]))
    assert code == "StatusCode.RESOURCE_EXHAUSTED"
    assert client.is_server_live()  # nothing crashed


def test_api_keys_guard_model_rpcs_and_metrics_count_calls(bundle_dir: Path, make_images: Callable[[int, int], np.ndarray]) -> None:
    images = make_images(2, 9)
    with serve(bundle_dir, api_keys=[KEY]) as served:
        client = served.client
        assert client.is_server_live() and client.is_server_ready()  # health stays open
        code, message = status_of(lambda: client.infer(MODEL, [uint8_input(images)]))
        assert code == "StatusCode.UNAUTHENTICATED" and "Bearer" in message
        code, _ = status_of(lambda: client.infer(MODEL, [uint8_input(images)], headers={"authorization": "Bearer wrong"}))
        assert code == "StatusCode.PERMISSION_DENIED"
        good = {"authorization": f"Bearer {KEY}", "x-ood-stream": "grpc-upstream"}
        assert client.infer(MODEL, [uint8_input(images)], headers=good).as_numpy("is_ood").shape == (2,)
        code, _ = status_of(lambda: client.infer(MODEL, [uint8_input(images)], headers={**good, "x-ood-stream": "bad stream!"}))
        assert code == "StatusCode.INVALID_ARGUMENT"
        auth = {"Authorization": f"Bearer {KEY}"}
        streams = httpx.get(f"{served.url}/v1/models/{MODEL}/drift", headers=auth).json()["streams"]
        assert [s["inputs_since_reset"] for s in streams if s["stream"] == "grpc-upstream"] == [2]
        metrics = httpx.get(f"{served.url}/metrics").text
        assert 'oodserve_grpc_requests_total{code="OK",method="ModelInfer"} 1.0' in metrics
        assert 'oodserve_grpc_requests_total{code="UNAUTHENTICATED",method="ModelInfer"} 1.0' in metrics
        assert f'oodserve_inputs_scored_total{{model="{MODEL}",verdict' in metrics


def test_declared_shapes_are_checked_before_any_array_is_built(server: Served) -> None:
    """Shapes that would allocate huge arrays, or that numpy cannot reshape to, are INVALID_ARGUMENT, not INTERNAL."""
    with grpc.insecure_channel(server.grpc_url) as channel:
        infer = channel.unary_unary(f"/{messages.SERVICE_NAME}/ModelInfer", request_serializer=messages.ModelInferRequest.SerializeToString,
                                    response_deserializer=messages.ModelInferResponse.FromString)
        cases = {"huge": ([0, 2**62, 2**62], b""), "rank 70": ([1] * 70, b"\x00"), "negative": ([-1, 1, 28, 28], b""),
                 "empty batch": ([0, 1, 28, 28], b"")}
        for label, (shape, raw) in cases.items():
            request = messages.ModelInferRequest(model_name=MODEL, raw_input_contents=[raw])
            request.inputs.add(name="x", datatype="UINT8", shape=shape)
            with pytest.raises(grpc.RpcError) as caught:
                infer(request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (label, caught.value.details())
        typed = messages.ModelInferRequest(model_name=MODEL)
        tensor = typed.inputs.add(name="x", datatype="UINT8", shape=[1, 1, 28, 28])
        tensor.contents.uint_contents.extend([300] * 784)
        with pytest.raises(grpc.RpcError) as caught:
            infer(typed)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "255" in caught.value.details()


def test_http_v2_refuses_undecodable_shapes_with_400(server: Served) -> None:
    for shape, data in (([1] * 70, [0]), ([0, 2**62, 2**62], [])):
        body = {"inputs": [{"name": "x", "shape": shape, "datatype": "UINT8", "data": data}]}
        response = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=30)
        assert response.status_code == 400 and "shape" in response.json()["error"], response.text


def test_model_rpcs_need_the_key_too(bundle_dir: Path) -> None:
    with serve(bundle_dir, api_keys=[KEY]) as served:
        for call in (lambda: served.client.get_model_metadata(MODEL), lambda: served.client.is_model_ready(MODEL)):
            code, _ = status_of(call)
            assert code == "StatusCode.UNAUTHENTICATED"
        assert served.client.is_model_ready(MODEL, headers={"authorization": f"Bearer {KEY}"})
