"""POST /v1/score through FastAPI: served signals, p-values and verdicts equal a numpy oracle to 1e-6."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from oodserve.bundle import write_bundle, write_calibration
from oodserve.server.app import create_app


def test_scores_match_the_numpy_oracle(client: TestClient, bundle_dir: Path, make_images, score_oracle, results_match) -> None:
    images = make_images(6, 11)
    response = client.post("/v1/score", json={"instances": images.tolist()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "test-bundle" and body["model_version"] == "1.2.3" and body["alpha"] == 0.1
    results_match(body["results"], score_oracle(bundle_dir, images, 0.1))


def test_out_of_distribution_inputs_are_flagged(client: TestClient, bundle_dir: Path, score_oracle, results_match) -> None:
    rng = np.random.default_rng(5)
    images = np.concatenate([np.zeros((2, 1, 28, 28)), np.full((1, 1, 28, 28), 255), rng.integers(0, 256, (2, 1, 28, 28))])
    body = client.post("/v1/score", json={"instances": images.astype(int).tolist()}).json()
    results_match(body["results"], score_oracle(bundle_dir, images, 0.1))
    assert all(result["is_ood"] for result in body["results"])


def test_results_keep_the_order_of_instances(client: TestClient, make_images) -> None:
    images = make_images(5, 21)
    forward = client.post("/v1/score", json={"instances": images.tolist()}).json()["results"]
    backward = client.post("/v1/score", json={"instances": images[::-1].tolist()}).json()["results"]
    singles = [client.post("/v1/score", json={"instances": [image.tolist()]}).json()["results"][0] for image in images]
    assert forward == backward[::-1]
    for batched, single in zip(forward, singles):
        assert batched["score"] == pytest.approx(single["score"], rel=1e-12)
        assert batched["p_value"] == single["p_value"]


def test_instances_with_and_without_the_channel_axis_are_equal(client: TestClient, make_images) -> None:
    images = make_images(2, 31)
    with_channel = client.post("/v1/score", json={"instances": images.tolist()}).json()
    without_channel = client.post("/v1/score", json={"instances": images[:, 0].tolist()}).json()
    assert with_channel == without_channel


def test_alpha_override_changes_the_verdict_only(client: TestClient, bundle_dir: Path, make_images, score_oracle, results_match) -> None:
    images = make_images(8, 41)
    smallest = client.get("/v1/models").json()["models"][0]["minimum_alpha"]  # below it: 422 alpha_below_resolution
    for alpha in (1.5 * smallest, 0.5, 0.999):
        body = client.post("/v1/score", json={"instances": images.tolist(), "alpha": alpha}).json()
        assert body["alpha"] == alpha
        results_match(body["results"], score_oracle(bundle_dir, images, alpha))
        assert [result["is_ood"] for result in body["results"]] == [result["p_value"] < alpha for result in body["results"]]
    strict = client.post("/v1/score", json={"instances": images.tolist(), "alpha": 0.999}).json()["results"]
    assert all(result["is_ood"] for result in strict)  # every p-value is below 0.999 (p = 1 needs a tie with all)


def test_prediction_is_present_with_a_classifier(client: TestClient, make_images) -> None:
    result = client.post("/v1/score", json={"instances": make_images(1, 51).tolist()}).json()["results"][0]
    prediction = result["prediction"]
    assert prediction["label"] == f"class-{prediction['class_index']}"
    assert 0.1 <= prediction["confidence"] <= 1.0


def test_named_model_endpoint_and_min_p_bundle_without_classifier(
    bundle_factory, make_images, score_oracle, results_match, settings_for
) -> None:
    fusion = {"method": "min_p", "signals": ["bits_per_dim", "sngp_variance"], "reason": "test"}
    bundle = bundle_factory(fusion=fusion, classifier=False, name="min-p-bundle")
    images = make_images(4, 61)
    with TestClient(create_app(settings_for(bundle))) as client:
        response = client.post("/v1/models/min-p-bundle/score", json={"instances": images.tolist(), "alpha": 0.2})
        assert response.status_code == 200
        results = response.json()["results"]
        assert all("prediction" not in result for result in results)
        results_match(results, score_oracle(bundle, images, 0.2, fusion))


def test_scores_tied_with_calibration_scores_count_as_at_least(bundle_factory, make_images, settings_for) -> None:
    """Calibrate on the exact served values: a score equal to calibration scores counts them as >= it."""
    signals = [{"name": "variance", "kind": "model_output", "model": "sngp", "output": "variance", "params": {}}]
    fusion = {"method": "fisher", "signals": ["variance"], "reason": "test"}
    bundle = bundle_factory(signals=signals, fusion=fusion)
    image = make_images(1, 71).tolist()
    with TestClient(create_app(settings_for(bundle))) as client:
        served = client.post("/v1/score", json={"instances": image}).json()["results"][0]["signals"]["variance"]
    fused = float(-2.0 * np.sum(np.log(np.array([4.0 / 5.0]))))
    write_calibration(
        bundle / "calibration.npz",
        {"variance": np.array([served - 1.0, served, served, served + 1.0]), "__fused__": np.array([fused - 1.0, fused, fused])},
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"]
    write_bundle(bundle, manifest)
    with TestClient(create_app(settings_for(bundle))) as client:
        result = client.post("/v1/score", json={"instances": image, "alpha": 0.5}).json()["results"][0]
    assert result["signals"]["variance"] == served
    assert result["p_values"]["variance"] == 4.0 / 5.0  # three of four calibration scores are >= (two ties)
    assert result["score"] == fused
    assert result["p_value"] == 3.0 / 4.0  # two ties among three fused calibration scores
    assert result["is_ood"] is False


def test_a_batch_may_mix_instances_with_and_without_channel(client: TestClient, make_images) -> None:
    images = make_images(2, 81)
    mixed = client.post("/v1/score", json={"instances": [images[0].tolist(), images[1, 0].tolist()]})
    uniform = client.post("/v1/score", json={"instances": images.tolist()})
    assert mixed.status_code == 200 and mixed.json() == uniform.json()
