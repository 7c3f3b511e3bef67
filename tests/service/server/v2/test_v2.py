"""Open Inference Protocol v2: metadata, health, readiness, infer with JSON and binary tensors (checked against
the numpy oracle), the `outputs` filter, `id` echo, alpha, v2-style errors, and the real tritonclient[http]."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from fastapi.testclient import TestClient

from oodserve.server.app import create_app
from oodserve.server.state import app_state
from tests.helpers.live_server import ServeProcess

MODEL = "test-bundle"
SIGNAL_NAMES = ["bits_per_dim", "typicality", "likelihood_ratio", "input_complexity", "sngp_variance", "log_prob_two_sided", "max_softmax"]
ALL_OUTPUTS = ["is_ood", "p_value", "score", *SIGNAL_NAMES, "class_index"]


def infer_body(images: np.ndarray, datatype: str = "UINT8", **extra: Any) -> dict[str, Any]:
    array = images.astype(np.uint8 if datatype == "UINT8" else np.float32)
    return {"inputs": [{"name": "x", "shape": list(array.shape), "datatype": datatype, "data": array.reshape(-1).tolist()}], **extra}


def outputs_by_name(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {output["name"]: output for output in body["outputs"]}


def assert_matches_oracle(outputs: dict[str, np.ndarray], expected: list[dict[str, Any]]) -> None:
    assert outputs["is_ood"].tolist() == [row["is_ood"] for row in expected]
    np.testing.assert_allclose(outputs["p_value"], [row["p_value"] for row in expected], rtol=1e-6)
    np.testing.assert_allclose(outputs["score"], [row["score"] for row in expected], rtol=1e-6)
    for name in SIGNAL_NAMES:
        np.testing.assert_allclose(outputs[name], [row["signals"][name] for row in expected], rtol=1e-6, atol=1e-6, err_msg=name)
    assert outputs["class_index"].tolist() == [row["prediction"]["class_index"] for row in expected]


def assert_v2_error(response: Any, status: int, *fragments: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error, str)
    for fragment in fragments:
        assert fragment in error, error


def test_server_metadata_health_and_readiness(client: TestClient) -> None:
    assert client.get("/v2").json() == {"name": "oodserve", "version": client.app.version, "extensions": ["binary_tensor_data"]}
    assert client.get("/v2/health/live").json() == {"live": True}
    assert client.get("/v2/health/ready").json() == {"ready": True}
    assert client.get(f"/v2/models/{MODEL}/ready").json() == {"name": MODEL, "ready": True}
    assert client.get(f"/v2/models/{MODEL}/versions/1.2.3/ready").status_code == 200


def test_model_metadata_lists_input_and_every_output(client: TestClient) -> None:
    metadata = client.get(f"/v2/models/{MODEL}").json()
    assert metadata["name"] == MODEL and metadata["versions"] == ["1.2.3"]
    assert metadata["inputs"] == [{"name": "x", "datatype": "UINT8", "shape": [-1, 1, 28, 28]}]
    assert [output["name"] for output in metadata["outputs"]] == ALL_OUTPUTS
    datatypes = {output["name"]: output["datatype"] for output in metadata["outputs"]}
    assert datatypes["is_ood"] == "BOOL" and datatypes["class_index"] == "INT64" and datatypes["typicality"] == "FP64"
    assert client.get(f"/v2/models/{MODEL}/versions/1.2.3").json() == metadata


@pytest.mark.parametrize(("datatype", "channel"), [("UINT8", False), ("UINT8", True), ("FP32", False), ("FP32", True)])
def test_infer_json_matches_the_oracle(
    client: TestClient, bundle_dir: Path, make_images, score_oracle, datatype: str, channel: bool
) -> None:
    images = make_images(4, 41)
    tensor = images if channel else images[:, 0]
    response = client.post(f"/v2/models/{MODEL}/infer", json=infer_body(tensor, datatype, id="request-7"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == MODEL and body["model_version"] == "1.2.3" and body["id"] == "request-7"
    assert body["parameters"] == {"alpha": 0.1}
    outputs = outputs_by_name(body)
    assert list(outputs) == ALL_OUTPUTS
    assert outputs["is_ood"]["datatype"] == "BOOL" and outputs["class_index"]["datatype"] == "INT64" and outputs["score"]["shape"] == [4]
    arrays = {name: np.array(output["data"]) for name, output in outputs.items()}
    assert_matches_oracle(arrays, score_oracle(bundle_dir, images, 0.1))


def test_outputs_filter_alpha_nested_data_and_version_route(client: TestClient, bundle_dir: Path, make_images, score_oracle) -> None:
    images = make_images(3, 42)
    body = {
        "inputs": [{"name": "x", "shape": [3, 28, 28], "datatype": "UINT8", "data": images[:, 0].tolist()}],
        "outputs": [{"name": "p_value"}, {"name": "is_ood"}],
        "parameters": {"alpha": 0.4},
    }
    response = client.post(f"/v2/models/{MODEL}/versions/1.2.3/infer", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    assert "id" not in result and result["parameters"] == {"alpha": 0.4}
    assert [output["name"] for output in result["outputs"]] == ["p_value", "is_ood"]
    expected = score_oracle(bundle_dir, images, 0.4)
    assert result["outputs"][1]["data"] == [row["is_ood"] for row in expected]
    np.testing.assert_allclose(result["outputs"][0]["data"], [row["p_value"] for row in expected], rtol=1e-9)


def test_binary_tensor_extension_both_ways(client: TestClient, bundle_dir: Path, make_images, score_oracle) -> None:
    images = make_images(2, 43)
    raw = images.astype(np.uint8).tobytes()
    header = orjson.dumps(
        {
            "inputs": [{"name": "x", "shape": [2, 1, 28, 28], "datatype": "UINT8", "parameters": {"binary_data_size": len(raw)}}],
            "outputs": [
                {"name": "score", "parameters": {"binary_data": True}},
                {"name": "is_ood", "parameters": {"binary_data": True}},
                {"name": "class_index"},
            ],
        }
    )
    response = client.post(
        f"/v2/models/{MODEL}/infer", content=header + raw, headers={"Inference-Header-Content-Length": str(len(header))}
    )
    assert response.status_code == 200, response.text
    length = int(response.headers["inference-header-content-length"])
    result = orjson.loads(response.content[:length])
    payload = response.content[length:]
    score_tensor, verdict_tensor, class_tensor = result["outputs"]
    assert score_tensor["parameters"] == {"binary_data_size": 16} and verdict_tensor["parameters"] == {"binary_data_size": 2}
    expected = score_oracle(bundle_dir, images, 0.1)
    np.testing.assert_allclose(np.frombuffer(payload[:16], "<f8"), [row["score"] for row in expected], rtol=1e-9)
    assert np.frombuffer(payload[16:18], np.bool_).tolist() == [row["is_ood"] for row in expected]
    assert class_tensor["data"] == [row["prediction"]["class_index"] for row in expected]
    assert len(payload) == 18


def test_v2_errors_are_plain_strings_with_400_or_404(client: TestClient, make_images) -> None:
    images = make_images(1, 44)
    url = f"/v2/models/{MODEL}/infer"
    good = infer_body(images)
    assert_v2_error(client.post("/v2/models/nope/infer", json=good), 404, "'nope'", MODEL)
    assert_v2_error(client.get("/v2/models/nope"), 404, "'nope'")
    assert_v2_error(client.post(f"/v2/models/{MODEL}/versions/9/infer", json=good), 404, "version '1.2.3'", "'9'")
    assert_v2_error(client.get("/v2/elsewhere"), 404, "/v2/elsewhere")
    assert_v2_error(client.post(url, content=b"{", headers={"content-type": "application/json"}), 400, "not valid JSON")
    assert_v2_error(client.post(url, json=[1]), 400, "JSON object")
    assert_v2_error(client.post(url, json={**good, "extra": 1}), 400, "'extra'")
    assert_v2_error(client.post(url, json={**good, "id": 5}), 400, "`id`")
    assert_v2_error(client.post(url, json={"inputs": []}), 400, "exactly one")
    tensor = good["inputs"][0]
    assert_v2_error(client.post(url, json={"inputs": [{**tensor, "name": "image"}]}), 400, "'image'", "'x'")
    assert_v2_error(client.post(url, json={"inputs": [{**tensor, "datatype": "INT32"}]}), 400, "'INT32'", "UINT8")
    assert_v2_error(client.post(url, json={"inputs": [{**tensor, "shape": [1, 28, 27]}]}), 400, "[1, 28, 27]", "[-1, 28, 28]")
    assert_v2_error(client.post(url, json={"inputs": [{**tensor, "shape": [2, 28, 28]}]}), 400, "1568", "784")
    assert_v2_error(client.post(url, json={"inputs": [{**tensor, "shape": [1, 784]}]}), 400, "[1, 784]", "[-1, 1, 28, 28]")
    assert_v2_error(client.post(url, json={"inputs": [{**tensor, "shape": [1, "28", 28]}]}), 400, "non-negative integers")
    assert_v2_error(client.post(url, json={"inputs": [{**tensor, "data": [True] * 784}]}), 400, "booleans")
    assert_v2_error(client.post(url, json={"inputs": [{**tensor, "data": [300] * 784}]}), 400, "[0, 255]")
    assert_v2_error(client.post(url, json={"inputs": [{**tensor, "data": [[1, 2], [3]]}]}), 400, "ragged")
    assert_v2_error(client.post(url, json={"inputs": [{**tensor, "datatype": "FP32", "data": [0.5] * 784}]}), 400, "uint8 expects integers")
    assert_v2_error(client.post(url, json={"inputs": [{**tensor, "shape": [0, 28, 28], "data": []}]}), 400, "no instances")
    assert_v2_error(client.post(url, json={**good, "outputs": [{"name": "nonsense"}]}), 400, "'nonsense'", "is_ood")
    assert_v2_error(client.post(url, json={**good, "parameters": {"alpha": 1.5}}), 400, "`alpha`")
    assert_v2_error(client.post(url, json={**good, "parameters": {"alpha": True}}), 400, "`alpha`")
    header = orjson.dumps({"inputs": [{**tensor, "data": None, "parameters": {"binary_data_size": 784}}]})
    assert_v2_error(client.post(url, content=header, headers={"Inference-Header-Content-Length": str(len(header))}), 400, "both")
    del tensor["data"]
    header = orjson.dumps({"inputs": [{**tensor, "parameters": {"binary_data_size": 784}}]})
    assert_v2_error(
        client.post(url, content=header + b"\0" * 10, headers={"Inference-Header-Content-Length": str(len(header))}), 400, "10 bytes"
    )
    assert_v2_error(client.post(url, content=header + b"\0" * 784, headers={"Inference-Header-Content-Length": "x"}), 400, "integer")
    assert_v2_error(client.post(url, content=header, headers={"Content-Encoding": "gzip"}), 400, "gzip")


def test_v2_before_readiness_is_503(bundle_dir: Path, settings_for) -> None:
    app = create_app(settings_for(bundle_dir))
    with TestClient(app) as client:
        app_state(app).ready = False
        assert client.get("/v2/health/live").status_code == 200
        assert_v2_error(client.get("/v2/health/ready"), 503, "starting")
        assert_v2_error(client.post(f"/v2/models/{MODEL}/infer", json={}), 503, "starting")
        app_state(app).ready = True


@pytest.fixture(scope="module")
def served(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`oodserve serve` on 127.0.0.1 in a subprocess; yields host:port for tritonclient."""
    with ServeProcess(bundle_dir, tmp_path_factory.mktemp("v2-serve") / "serve.log") as server:
        server.wait_ready()
        yield f"127.0.0.1:{server.port}"
        server.stop()


@pytest.mark.parametrize("binary", [True, False])
def test_tritonclient_http_against_a_real_server(served: str, bundle_dir: Path, make_images, score_oracle, binary: bool) -> None:
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    client = triton.InferenceServerClient(url=served)
    try:
        assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL)
        assert client.get_server_metadata()["name"] == "oodserve"
        metadata = client.get_model_metadata(MODEL, model_version="1.2.3")
        assert [output["name"] for output in metadata["outputs"]] == ALL_OUTPUTS
        images = make_images(3, 45)
        tensor = triton.InferInput("x", [3, 28, 28], "UINT8")
        tensor.set_data_from_numpy(images[:, 0].astype(np.uint8), binary_data=binary)
        result = client.infer(MODEL, [tensor], request_id="triton-1")
        assert result.get_response()["id"] == "triton-1"
        assert_matches_oracle({name: result.as_numpy(name) for name in ALL_OUTPUTS}, score_oracle(bundle_dir, images, 0.1))
        assert result.as_numpy("is_ood").dtype == np.bool_ and result.as_numpy("class_index").dtype == np.int64

        floats = triton.InferInput("x", [3, 1, 28, 28], "FP32")
        floats.set_data_from_numpy(images.astype(np.float32), binary_data=binary)
        wanted = [triton.InferRequestedOutput("p_value", binary_data=binary), triton.InferRequestedOutput("is_ood", binary_data=binary)]
        filtered = client.infer(MODEL, [floats], outputs=wanted, parameters={"alpha": 0.5})
        assert [output["name"] for output in filtered.get_response()["outputs"]] == ["p_value", "is_ood"]
        expected = score_oracle(bundle_dir, images, 0.5)
        assert filtered.as_numpy("is_ood").tolist() == [row["is_ood"] for row in expected]
        assert filtered.as_numpy("score") is None

        with pytest.raises(InferenceServerException) as unknown:
            client.infer("no-such-model", [tensor])
        assert "no-such-model" in unknown.value.message() and unknown.value.status() == "404"
        assert not client.is_model_ready("no-such-model")
    finally:
        client.close()
