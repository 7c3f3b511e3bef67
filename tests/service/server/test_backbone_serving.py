"""A served backbone bundle answers v1 (JSON, .npy, PNG), v2 REST and v2 gRPC with the backbone's prediction beside the
verdict, and the same verdicts on every path; a vector bundle-style client is not needed: images go in raw."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from oodserve.bundle.preprocess import PreprocessSpec, apply_preprocess, resize_image
from oodserve.bundle.writer import sha256_file
from oodserve.server.app import create_app
from oodserve.server.state import app_state
from tests.helpers.backbone_bundles import tiny_backbone_bundle
from tests.helpers.backbones import coloured_images
from tests.helpers.bundles import make_settings
from tests.helpers.live_server import uvicorn_in_thread

MODEL = "tiny-backbone"
pytestmark = pytest.mark.slow  # fits a tiny backbone bundle (about 10 s on two idle cores)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_backbone_bundle(tmp_path_factory.mktemp("served"), preprocess={"resize": "resize"})


@pytest.fixture(scope="module")
def client(bundle: Path) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(bundle))) as test_client:
        yield test_client


def expected_classes(bundle: Path, images: np.ndarray) -> list[int]:
    spec = PreprocessSpec(input_name="image", layout="NHWC", dtype="uint8", size=(16, 16), scale=1.0)
    user = ort.InferenceSession(str(bundle.parent / "model.onnx"), providers=["CPUExecutionProvider"])
    return user.run(["logits"], {"image": apply_preprocess(images, spec)})[0].argmax(axis=1).tolist()


def test_v1_json_npy_and_png_give_the_prediction_and_one_verdict(client: TestClient, bundle: Path) -> None:
    images, _ = coloured_images(4, seed=11)
    classes = expected_classes(bundle, images)
    body = client.post("/v1/score", json={"instances": images.astype(int).tolist()}).json()
    assert [row["prediction"]["class_index"] for row in body["results"]] == classes
    assert body["results"][0]["prediction"]["label"] == f"class{classes[0]}"
    assert {"knn_distance", "energy", "vim"} <= set(body["results"][0]["signals"])
    buffer = io.BytesIO()
    np.save(buffer, images.transpose(0, 2, 3, 1))  # channels-last, as numpy and PIL hold images
    npy = client.post("/v1/score", content=buffer.getvalue(), headers={"content-type": "application/x-npy"}).json()
    assert [row["p_value"] for row in npy["results"]] == [row["p_value"] for row in body["results"]]
    png = io.BytesIO()
    Image.fromarray(images[0].transpose(1, 2, 0)).save(png, format="PNG")
    single = client.post("/v1/score", content=png.getvalue(), headers={"content-type": "image/png"}).json()
    assert single["results"][0]["p_value"] == body["results"][0]["p_value"]
    assert single["results"][0]["prediction"]["class_index"] == classes[0]


def test_v2_rest_and_grpc_answer_with_the_class_index(bundle: Path) -> None:
    grpcclient = pytest.importorskip("tritonclient.grpc")
    images, _ = coloured_images(3, seed=12)
    classes = expected_classes(bundle, images)
    app = create_app(make_settings(bundle, grpc_port=0))
    with uvicorn_in_thread(app) as url:
        tensor = {"name": "x", "shape": list(images.shape), "datatype": "UINT8", "data": images.reshape(-1).tolist()}
        rest = httpx.post(f"{url}/v2/models/{MODEL}/infer", json={"inputs": [tensor]}).json()
        outputs = {output["name"]: output["data"] for output in rest["outputs"]}
        assert outputs["class_index"] == classes
        client = grpcclient.InferenceServerClient(url=f"127.0.0.1:{app_state(app).grpc_port}")
        try:
            request = grpcclient.InferInput("x", list(images.shape), "UINT8")
            request.set_data_from_numpy(images)
            result = client.infer(MODEL, [request])
            assert result.as_numpy("class_index").tolist() == classes
            np.testing.assert_allclose(result.as_numpy("p_value"), outputs["p_value"], rtol=0, atol=1e-12)
        finally:
            client.close()


def test_wrong_image_size_is_a_4xx_naming_the_shape(client: TestClient) -> None:
    response = client.post("/v1/score", json={"instances": np.zeros((1, 3, 20, 20), int).tolist()})
    assert 400 <= response.status_code < 500 and "[3, 16, 16]" in response.text


def test_image_files_of_any_size_are_resized_as_declared(client: TestClient) -> None:
    images, _ = coloured_images(1, seed=13, size=40)
    png = io.BytesIO()
    Image.fromarray(images[0].transpose(1, 2, 0)).save(png, format="PNG")
    large = client.post("/v1/score", content=png.getvalue(), headers={"content-type": "image/png"})
    assert large.status_code == 200, large.text
    resized = resize_image(images[0], (16, 16), "resize")
    small = client.post("/v1/score", json={"instances": [resized.astype(int).tolist()]}).json()
    assert large.json()["results"][0]["p_value"] == small["results"][0]["p_value"]


def test_model_description_shows_the_backbone_and_its_preprocessing(client: TestClient, bundle: Path) -> None:

    described = next(model for model in client.get("/v1/models").json()["models"] if model["name"] == MODEL)
    assert described["backbone"]["source_sha256"] == sha256_file(bundle.parent / "model.onnx")
    assert described["backbone"]["preprocess"]["layout"] == "NHWC" and described["input"]["resize"] == "resize"
    assert described["classifier"] == {"model": "backbone", "logits": "logits"}
