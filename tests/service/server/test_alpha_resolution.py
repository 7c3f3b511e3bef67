"""alpha below the smallest p-value a bundle can give, 1 / (n + 1), is refused on v1 and v2, naming that alpha."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
from fastapi.testclient import TestClient


def test_alpha_below_the_calibration_resolution_is_refused_on_v1_and_v2(
    client: TestClient, make_images: Callable[[int, int], np.ndarray]
) -> None:
    (model,) = client.get("/v1/models").json()["models"]
    minimum = model["minimum_alpha"]
    assert minimum == 1.0 / (model["fusion"]["calibration_size"] + 1)
    image = make_images(1, 3)
    too_small = minimum / 2
    v1 = client.post("/v1/score", json={"instances": image.tolist(), "alpha": too_small})
    assert v1.status_code == 422 and v1.json()["error"]["code"] == "alpha_below_resolution"
    assert f"{minimum:.6g}" in v1.json()["error"]["message"]
    assert client.post("/v1/score", json={"instances": image.tolist(), "alpha": minimum}).status_code == 422  # nothing could be flagged
    buffer = io.BytesIO()
    np.save(buffer, image.astype(np.float32))
    npy = client.post(f"/v1/score?alpha={too_small}", content=buffer.getvalue(), headers={"content-type": "application/x-npy"})
    assert npy.status_code == 422 and npy.json()["error"]["code"] == "alpha_below_resolution"
    body = {
        "inputs": [{"name": "x", "shape": [1, 1, 28, 28], "datatype": "UINT8", "data": image.ravel().tolist()}],
        "parameters": {"alpha": too_small},
    }
    v2 = client.post(f"/v2/models/{model['name']}/infer", json=body)
    assert v2.status_code == 400 and "alpha must be above" in v2.json()["error"]
    body["parameters"] = {"alpha": minimum * 1.01}
    assert client.post(f"/v2/models/{model['name']}/infer", json=body).status_code == 200
