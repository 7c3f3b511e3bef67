"""API keys: 401 without a key (with a Bearer challenge), 403 with a wrong one, constant-time comparison,
health and metrics open unless configured, admin endpoints disabled (not open) without admin keys."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr, ValidationError

import oodserve.dataplane
from oodserve.config import Settings
from oodserve.dataplane import key_matches
from oodserve.engine import EngineRegistry, load_registry
from oodserve.runtime.sessions import RuntimeOptions
from oodserve.server.app import create_app

SCORE_BODY = {"instances": [np.zeros((28, 28), int).tolist()]}


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def registry(bundle_dir: Path) -> EngineRegistry:
    return load_registry([bundle_dir], RuntimeOptions(intra_op_threads=1, inter_op_threads=1))


@pytest.fixture(scope="module")
def client_with(registry: EngineRegistry, settings_for: Callable[..., Settings], bundle_dir: Path) -> Callable[..., Any]:
    """client_with(**settings) -> context manager of a ready TestClient sharing the loaded engines."""

    def make(**overrides: Any) -> TestClient:
        return TestClient(create_app(settings_for(bundle_dir, **overrides), registry))

    return make


@pytest.fixture(scope="module")
def keyed(client_with: Callable[..., TestClient]) -> Iterator[TestClient]:
    with client_with(api_keys=["score-key-1", "score-key-2"], admin_keys=["admin-key"]) as client:
        yield client


def test_key_matches_only_configured_keys() -> None:
    keys = [SecretStr("alpha-key"), SecretStr("beta-key")]
    assert key_matches("alpha-key", keys) and key_matches("beta-key", keys)
    for wrong in ["alpha-ke", "alpha-key ", "ALPHA-KEY", "", "alpha-keyalpha-key", "beta-key\x00"]:
        assert not key_matches(wrong, keys), wrong
    assert not key_matches("anything", [])


def test_every_configured_key_is_compared_with_compare_digest(monkeypatch: pytest.MonkeyPatch) -> None:
    """No early exit: a match on the first key still compares the others, each in constant time."""
    calls: list[tuple[bytes, bytes]] = []
    real = oodserve.dataplane.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(oodserve.dataplane.hmac, "compare_digest", counting)
    keys = [SecretStr("first"), SecretStr("second-and-longer"), SecretStr("third")]
    assert key_matches("first", keys)
    assert len(calls) == 3 and all(len(a) == len(b) == 32 for a, b in calls)  # sha256 digests: equal lengths


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [("post", "/v1/score", SCORE_BODY), ("post", "/v1/models/test-bundle/score", SCORE_BODY), ("get", "/v1/models", None)],
)
def test_scoring_endpoints_need_a_valid_key(keyed: TestClient, method: str, path: str, body: Any) -> None:
    send = getattr(keyed, method)
    kwargs = {"json": body} if body is not None else {}
    missing = send(path, **kwargs)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    not_bearer = send(path, headers={"authorization": "Basic c2NvcmUta2V5LTE6"}, **kwargs)
    assert not_bearer.status_code == 401
    wrong = send(path, headers=bearer("score-key-3"), **kwargs)
    assert wrong.status_code == 403 and wrong.json()["error"]["code"] == "forbidden"
    assert send(path, headers=bearer("admin-key"), **kwargs).status_code == 403  # admin keys do not score
    for key in ["score-key-1", "score-key-2"]:
        assert send(path, headers=bearer(key), **kwargs).status_code == 200


def test_v2_inference_needs_a_valid_key(keyed: TestClient) -> None:
    body = {"inputs": [{"name": "x", "datatype": "UINT8", "shape": [1, 28, 28], "data": [0] * 784}]}
    assert keyed.post("/v2/models/test-bundle/infer", json=body).status_code == 401
    assert keyed.post("/v2/models/test-bundle/infer", json=body, headers=bearer("nope")).status_code == 403
    assert keyed.post("/v2/models/test-bundle/infer", json=body, headers=bearer("score-key-1")).status_code == 200


def test_health_and_metrics_stay_open_by_default(keyed: TestClient) -> None:
    for path in ["/healthz", "/readyz", "/metrics", "/v2/health/live", "/v2/health/ready"]:
        assert keyed.get(path).status_code == 200, path


def test_protected_metrics_need_a_scoring_or_admin_key(client_with: Callable[..., TestClient]) -> None:
    with client_with(api_keys=["score-key"], admin_keys=["admin-key"], protect_metrics=True) as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers=bearer("wrong")).status_code == 403
        assert client.get("/metrics", headers=bearer("score-key")).status_code == 200
        assert client.get("/metrics", headers=bearer("admin-key")).status_code == 200
        assert client.get("/healthz").status_code == 200


def test_admin_endpoints_need_the_admin_key(keyed: TestClient) -> None:
    assert keyed.post("/v1/admin/reload").status_code == 401
    assert keyed.post("/v1/admin/reload", headers=bearer("score-key-1")).status_code == 403
    assert keyed.post("/v1/admin/reload", headers=bearer("admin-key")).status_code == 200


def test_admin_endpoints_are_disabled_without_admin_keys(client_with: Callable[..., TestClient]) -> None:
    with client_with() as client:  # no keys at all: scoring open, admin disabled
        assert client.post("/v1/score", json=SCORE_BODY).status_code == 200
        for headers in [{}, bearer("anything"), bearer("")]:
            response = client.post("/v1/admin/reload", headers=headers)
            assert response.status_code == 403, headers
            error = response.json()["error"]
            assert error["code"] == "admin_disabled" and "OODSERVE_ADMIN_KEYS" in error["message"]


def test_keys_come_from_the_environment_and_stay_secret(monkeypatch: pytest.MonkeyPatch, bundle_dir: Path) -> None:
    monkeypatch.setenv("OODSERVE_API_KEYS", "key-one, key-two")
    monkeypatch.setenv("OODSERVE_ADMIN_KEYS", '["admin-one"]')
    settings = Settings(bundle=bundle_dir)
    assert [key.get_secret_value() for key in settings.api_keys] == ["key-one", "key-two"]
    assert [key.get_secret_value() for key in settings.admin_keys] == ["admin-one"]
    assert "key-one" not in repr(settings) and "admin-one" not in repr(settings)


def test_protecting_metrics_without_any_key_is_a_settings_error(bundle_dir: Path) -> None:
    with pytest.raises(ValidationError, match="PROTECT_METRICS"):
        Settings(bundle=bundle_dir, protect_metrics=True, api_keys=[], admin_keys=[])


def test_openapi_documents_the_bearer_schemes(keyed: TestClient) -> None:
    schema = keyed.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert schema["paths"]["/v1/score"]["post"]["security"] == [{"HTTPBearer": []}]
    assert schema["paths"]["/v1/admin/reload"]["post"]["security"] == [{"AdminBearer": []}]
    assert {"401", "403"} <= set(schema["paths"]["/v1/score"]["post"]["responses"])
