"""Bundles with a sampler and a batch typicality test: POST /sample and the `batch` response object."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from oodserve.bundle.loader import BundleError, load_bundle
from oodserve.bundle.writer import write_bundle
from oodserve.scoring.batch_typicality import BatchTypicalityTest
from oodserve.server.app import create_app

ENTROPY = 7.5


def affine_sampler_model() -> onnx.ModelProto:
    """z (N, 784) -> x = reshape(128 + 100 z) (N, 1, 28, 28): a closed-form stand-in for a flow's inverse."""
    nodes = [
        helper.make_node("Mul", ["z", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "offset"], ["shifted"]),
        helper.make_node("Reshape", ["shifted", "shape"], ["x"]),
    ]
    graph = helper.make_graph(
        nodes, "sampler",
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 784])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        initializer=[
            numpy_helper.from_array(np.array(100.0, np.float32), "scale"),
            numpy_helper.from_array(np.array(128.0, np.float32), "offset"),
            numpy_helper.from_array(np.array([-1, 1, 28, 28], np.int64), "shape"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def with_extras(source: Path, target: Path, reference: np.ndarray, batch_signal: str = "bits_per_dim") -> Path:
    shutil.copytree(source, target)
    onnx.save_model(affine_sampler_model(), target / "flow_sample.onnx")
    with open(target / "batch.npz", "wb") as handle:
        np.savez(handle, reference_bpd=reference)
    fields = json.loads((target / "manifest.json").read_text())
    fields.pop("files")
    fields["sampler"] = {"file": "flow_sample.onnx", "input": "z", "output": "x", "latent_shape": [784]}
    fields["batch_typicality"] = {"signal": batch_signal, "entropy_bpd": ENTROPY, "parameters_file": "batch.npz", "n_bootstrap": 500}
    write_bundle(target, fields)
    return target


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return np.random.default_rng(3).normal(ENTROPY, 0.2, 400)


@pytest.fixture(scope="module")
def extended_client(bundle_dir: Path, tmp_path_factory: pytest.TempPathFactory, reference: np.ndarray, settings_for):
    bundle = with_extras(bundle_dir, tmp_path_factory.mktemp("extended") / "bundle", reference)
    with TestClient(create_app(settings_for(bundle))) as client:
        yield client


def test_sample_png_grid(extended_client: TestClient) -> None:
    response = extended_client.post("/v1/models/test-bundle/sample", json={"n": 9, "temperature": 0.5, "seed": 1})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    grid = np.asarray(Image.open(io.BytesIO(response.content)))
    assert grid.shape == (3 * 30 + 2, 3 * 30 + 2)


def test_sample_json_is_the_sampler_of_scaled_latents(extended_client: TestClient) -> None:
    response = extended_client.post(
        "/v1/models/test-bundle/sample", json={"n": 4, "temperature": 0.5, "seed": 7}, headers={"accept": "application/json"}
    )
    assert response.status_code == 200
    samples = np.asarray(response.json()["samples"])
    latents = np.random.default_rng(7).standard_normal((4, 784)).astype(np.float32) * np.float32(0.5)
    expected = np.clip(np.rint(128 + 100 * latents.astype(np.float64)), 0, 255).reshape(4, 1, 28, 28)
    assert samples.shape == (4, 1, 28, 28)
    assert np.max(np.abs(samples - expected)) <= 1


@pytest.mark.parametrize("body", [{"n": 0}, {"n": 10_000}, {"temperature": 0}, {"temperature": 5}, {"colour": 1}])
def test_sample_rejects_bad_options(extended_client: TestClient, body: dict) -> None:
    response = extended_client.post("/v1/models/test-bundle/sample", json=body)
    assert response.status_code == 422 and response.json()["error"]["message"]


def test_sample_without_sampler_is_404(client: TestClient) -> None:
    response = client.post("/v1/models/test-bundle/sample", json={"n": 2})
    assert response.status_code == 404 and "no generative flow" in response.json()["error"]["message"]


def test_batch_object_matches_numpy(extended_client: TestClient, make_images, reference: np.ndarray) -> None:
    images = make_images(5, 11)
    response = extended_client.post("/v1/score", json={"instances": images.tolist(), "alpha": 0.1})
    body = response.json()
    bpd = np.array([r["signals"]["bits_per_dim"] for r in body["results"]])
    statistic = abs(bpd.mean() - ENTROPY)
    expected = BatchTypicalityTest(reference, ENTROPY).test(bpd, 0.1)
    batch = body["batch"]
    assert batch["size"] == 5 and batch["alpha"] == 0.1 and batch["reference_batches"] == len(reference) // 5
    assert batch["statistic"] == pytest.approx(statistic, abs=1e-9)
    assert batch["p_value"] == pytest.approx(expected.p_value) and batch["minimum_alpha"] == pytest.approx(1 / (len(reference) // 5 + 1))
    assert batch["is_ood"] == (batch["p_value"] < 0.1)


def test_single_instance_has_no_batch_object(extended_client: TestClient, make_images) -> None:
    response = extended_client.post("/v1/score", json={"instances": make_images(1, 2).tolist()})
    assert response.status_code == 200 and "batch" not in response.json()


def test_batch_test_must_use_a_bits_per_dim_signal(bundle_dir: Path, tmp_path: Path, reference: np.ndarray) -> None:
    with pytest.raises(ValueError, match="bits_per_dim"):
        with_extras(bundle_dir, tmp_path / "bad", reference, batch_signal="typicality")


def test_tampered_sampler_is_refused(bundle_dir: Path, tmp_path: Path, reference: np.ndarray) -> None:
    bundle = with_extras(bundle_dir, tmp_path / "tampered", reference)
    (bundle / "flow_sample.onnx").write_bytes(b"not a model")
    with pytest.raises(BundleError, match="flow_sample.onnx"):
        load_bundle(bundle)
