"""Every bundle shipped under models/bundles/ verifies, loads and scores its own calibration-like data sanely."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.server.app import create_app

SHIPPED = sorted(path.parent for path in (Path(__file__).resolve().parents[3] / "models" / "bundles").glob("*/manifest.json"))


@pytest.mark.parametrize("bundle", SHIPPED, ids=[path.name for path in SHIPPED])
def test_shipped_bundle_serves(bundle: Path, settings_for) -> None:
    with TestClient(create_app(settings_for(bundle))) as client:
        summary = client.get("/v1/models").json()["models"][0]
        shape = summary["input"]["shape"]
        blank = np.zeros(shape, dtype=int).tolist()
        noise = np.random.default_rng(0).integers(0, 256, shape).tolist()
        response = client.post("/v1/score", json={"instances": [blank, noise]})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
    assert all(0 < result["p_value"] <= 1 for result in results)
    assert set(results[0]["signals"]) == {signal["name"] for signal in summary["signals"]}
    assert results[1]["is_ood"]  # uniform noise is far from any natural-image bundle


def test_the_demo_bundle_is_shipped() -> None:
    assert "demo" in [path.name for path in SHIPPED]
