"""Every client mistake gets a JSON 4xx {"error": {"code", "message"}} saying what was expected and what came."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient


def blank(value: Any = 0, shape: tuple[int, ...] = (28, 28)) -> list:
    return np.full(shape, 0, dtype=object).tolist() if value == 0 else _filled(value, shape)


def _filled(value: Any, shape: tuple[int, ...]) -> list:
    rows = np.zeros(shape, dtype=object)
    rows[(0,) * len(shape)] = value
    return rows.tolist()


def assert_error(response: Any, status: int, code: str, *fragments: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error["message"]


def test_malformed_json_is_400(client: TestClient) -> None:
    response = client.post("/v1/score", content=b'{"instances": [[1, 2', headers={"content-type": "application/json"})
    assert_error(response, 400, "malformed_json", "not valid JSON")
    assert_error(client.post("/v1/score", content=b"", headers={"content-type": "application/json"}), 400, "malformed_json")
    too_deep = b'{"instances": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    assert_error(client.post("/v1/score", content=too_deep, headers={"content-type": "application/json"}), 400, "malformed_json")
    not_utf8 = b'{"instances": "\xff\xfe"}'
    assert_error(client.post("/v1/score", content=not_utf8, headers={"content-type": "application/json"}), 400, "malformed_json")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_wrong_content_type_is_415(client: TestClient, content_type: str | None) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/score", content=b'{"instances": []}', headers=headers)
    assert_error(response, 415, "unsupported_media_type", "expected Content-Type application/json", str(content_type or "none"))


def test_json_with_charset_is_accepted(client: TestClient) -> None:
    body = b'{"instances": [' + str(blank()).encode() + b"]}"
    response = client.post("/v1/score", content=body, headers={"content-type": "application/json; charset=utf-8"})
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("instances", "fragments"),
    [
        ([blank(0, (27, 28))], ["[1, 28, 28] or [28, 28]", "got shape [27, 28]"]),
        ([blank(0, (3, 28, 28))], ["got shape [3, 28, 28]"]),
        ([blank(), blank(0, (28, 27))], ["instance 1", "got shape [28, 27]"]),
        ([[[0] * 28] * 27 + [[0] * 27]], ["ragged"]),
        ([7], ["instance 0", "got int 7"]),
        ("not a list", ["must be a JSON array"]),
    ],
)
def test_wrong_shape_is_422(client: TestClient, instances: Any, fragments: list[str]) -> None:
    code = "invalid_request" if isinstance(instances, str) else "invalid_shape"
    assert_error(client.post("/v1/score", json={"instances": instances}), 422, code, *fragments)


@pytest.mark.parametrize(
    ("value", "fragments"),
    [("12", ["non-numeric value '12' (str)"]), (None, ["None (NoneType)"]), (True, ["True (bool)"]), ({"a": 1}, ["(dict)"])],
)
def test_non_numeric_values_are_422(client: TestClient, value: Any, fragments: list[str]) -> None:
    assert_error(client.post("/v1/score", json={"instances": [_filled(value, (28, 28))]}), 422, "invalid_value", *fragments)


@pytest.mark.parametrize("literal", [b"NaN", b"Infinity", b"-Infinity", b"1e999"])
def test_nan_and_infinity_are_422(client: TestClient, literal: bytes) -> None:
    row = b"[" + b", ".join([literal] + [b"0"] * 27) + b"]"
    body = b'{"instances": [[' + b", ".join([row] * 28) + b"]]}"
    response = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert_error(response, 422, "invalid_value", "expected finite numbers in [0, 255]", "at [0, 0]")


@pytest.mark.parametrize(("value", "code"), [(256, "out_of_range"), (-1, "out_of_range"), (12.5, "invalid_dtype")])
def test_out_of_range_and_non_integer_pixels_are_422(client: TestClient, value: float, code: str) -> None:
    message = assert_error(client.post("/v1/score", json={"instances": [blank(), _filled(value, (1, 28, 28))]}), 422, code)
    assert "instance 1" in message and "at [0, 0, 0]" in message


def test_empty_batch_and_missing_or_unknown_fields_are_422(client: TestClient) -> None:
    assert_error(client.post("/v1/score", json={"instances": []}), 422, "empty_batch", "at least one instance")
    assert_error(client.post("/v1/score", json={"alpha": 0.1}), 422, "invalid_request", "needs `instances`")
    assert_error(client.post("/v1/score", json=[blank()]), 422, "invalid_request", "JSON object", "got a JSON array")
    null_body = client.post("/v1/score", content=b"null", headers={"content-type": "application/json"})
    assert_error(null_body, 422, "invalid_request", "got a JSON null")
    assert_error(client.post("/v1/score", json={"instances": [blank()], "alhpa": 0.1}), 422, "invalid_request", "alhpa")


@pytest.mark.parametrize("alpha", [0, 1, -0.5, 1.5, "0.1", True])
def test_alpha_outside_the_open_unit_interval_is_422(client: TestClient, alpha: Any) -> None:
    assert_error(client.post("/v1/score", json={"instances": [blank()], "alpha": alpha}), 422, "invalid_alpha", "in (0, 1)")


def test_too_many_instances_is_413(client: TestClient) -> None:
    response = client.post("/v1/score", json={"instances": [blank()] * 17})
    assert_error(response, 413, "too_many_instances", "got 17 instances", "at most 16")


def test_body_larger_than_the_limit_is_413_by_content_length(client: TestClient) -> None:
    body = b'{"instances": [' + b" " * 400_001 + b"]}"
    response = client.post("/v1/score", content=body, headers={"content-type": "application/json"})
    assert_error(response, 413, "body_too_large", "limit is 400000 bytes")


def test_body_larger_than_the_limit_is_413_when_streamed(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"instances": ['
        for _ in range(50):
            yield b" " * 10_000

    response = client.post("/v1/score", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "body_too_large", "exceeds the limit of 400000 bytes")


def test_unknown_model_is_404(client: TestClient) -> None:
    assert_error(client.get("/v1/models/nope"), 404, "model_not_found", "'nope'", "test-bundle")
    assert_error(client.post("/v1/models/nope/score", json={"instances": [blank()]}), 404, "model_not_found")


def test_unknown_route_and_method_are_json_errors(client: TestClient) -> None:
    assert_error(client.get("/v9/nothing"), 404, "not_found", "/v9/nothing")  # /v2 paths answer in the v2 error form (test_v2.py)
    assert_error(client.get("/v1/score"), 405, "method_not_allowed", "GET")
