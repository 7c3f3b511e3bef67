"""Binary score bodies: .npy arrays, one PNG, multipart PNG files; each scores like JSON (numpy oracle) and
every malformed or wrong body is a 4xx JSON error naming the problem."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from oodserve.scoring.inputs import MalformedInputError
from oodserve.scoring.payloads import fast_npy_header, read_npy
from oodserve.server.errors import as_api_error

NPY = {"content-type": "application/x-npy"}

PNG = {"content-type": "image/png"}


def assert_error(response: Any, status: int, code: str, *fragments: str) -> str:
    """The response is a JSON error of this status and code whose message holds every fragment."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    for fragment in fragments:
        assert fragment in error["message"], error["message"]
    return error["message"]


def npy_bytes(array: np.ndarray, fortran: bool = False) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.asfortranarray(array) if fortran else array)
    return buffer.getvalue()


def png_bytes(pixels: np.ndarray) -> bytes:
    """PNG of an (H, W) uint8 (8-bit grey), (H, W) uint16 (16-bit grey) or (H, W, 4) uint8 (RGBA) array."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("shape", ["N,28,28", "N,1,28,28"])
@pytest.mark.parametrize("dtype", [np.uint8, np.int64, np.float32, np.float64])
def test_npy_scores_match_the_oracle(
    client: TestClient, bundle_dir: Path, make_images, score_oracle, results_match, shape: str, dtype: Any
) -> None:
    images = make_images(4, 31)
    array = (images[:, 0] if shape == "N,28,28" else images).astype(dtype)
    response = client.post("/v1/score?alpha=0.2", content=npy_bytes(array), headers=NPY)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["alpha"] == 0.2
    results_match(body["results"], score_oracle(bundle_dir, images, 0.2))


def test_npy_in_fortran_order_and_on_the_named_route(
    client: TestClient, bundle_dir: Path, make_images, score_oracle, results_match
) -> None:
    images = make_images(3, 32)
    response = client.post("/v1/models/test-bundle/score", content=npy_bytes(images[:, 0], fortran=True), headers=NPY)
    assert response.status_code == 200, response.text
    results_match(response.json()["results"], score_oracle(bundle_dir, images, 0.1))


def test_npy_errors_are_4xx_naming_the_problem(client: TestClient, make_images) -> None:
    image = make_images(1, 33)
    assert_error(client.post("/v1/score", content=b"not an array", headers=NPY), 400, "malformed_npy", "magic string")
    archive = io.BytesIO()
    np.savez(archive, x=image)
    assert_error(client.post("/v1/score", content=archive.getvalue(), headers=NPY), 400, "malformed_npy", "magic string")
    truncated = npy_bytes(image)[:-10]
    assert_error(client.post("/v1/score", content=truncated, headers=NPY), 400, "malformed_npy", "body carries")
    huge_header = npy_bytes(np.zeros((1, 28, 28), np.uint8)).replace(b"(1, 28, 28)", b"(99999999999, 28, 28)".ljust(11))
    assert_error(client.post("/v1/score", content=huge_header, headers=NPY), 400, "malformed_npy", "99999999999")
    objects = io.BytesIO()
    np.save(objects, np.array([[1, "a"]], dtype=object), allow_pickle=True)
    assert_error(client.post("/v1/score", content=objects.getvalue(), headers=NPY), 422, "invalid_dtype", "pickle")
    assert_error(client.post("/v1/score", content=npy_bytes(image.astype(bool)), headers=NPY), 422, "invalid_dtype", "|b1")
    assert_error(client.post("/v1/score", content=npy_bytes(image[0, 0]), headers=NPY), 422, "invalid_shape", "[28, 28]")
    assert_error(client.post("/v1/score", content=npy_bytes(np.zeros((2, 27, 28))), headers=NPY), 422, "invalid_shape", "[2, 27, 28]")
    assert_error(client.post("/v1/score", content=npy_bytes(np.zeros((0, 28, 28))), headers=NPY), 422, "empty_batch")
    assert_error(
        client.post("/v1/score", content=npy_bytes(np.zeros((17, 28, 28), np.uint8)), headers=NPY), 413, "too_many_instances", "17"
    )
    bad = image.astype(np.float32)
    bad[0, 0, 3, 4] = np.nan
    assert_error(client.post("/v1/score", content=npy_bytes(bad), headers=NPY), 422, "invalid_value", "[0, 3, 4]")
    bad[0, 0, 3, 4] = 256
    assert_error(client.post("/v1/score", content=npy_bytes(bad), headers=NPY), 422, "out_of_range", "256")
    bad[0, 0, 3, 4] = 12.5
    assert_error(client.post("/v1/score", content=npy_bytes(bad), headers=NPY), 422, "invalid_dtype", "integers")
    assert_error(client.post("/v1/score?alpha=1.5", content=npy_bytes(image), headers=NPY), 422, "invalid_alpha", "(0, 1)")
    assert_error(client.post("/v1/score?alpha=abc", content=npy_bytes(image), headers=NPY), 422, "invalid_alpha", "'abc'")


def test_one_png_scores_like_its_pixels(client: TestClient, bundle_dir: Path, make_images, score_oracle, results_match) -> None:
    images = make_images(1, 34)
    response = client.post("/v1/score?alpha=0.3", content=png_bytes(images[0, 0]), headers=PNG)
    assert response.status_code == 200, response.text
    results_match(response.json()["results"], score_oracle(bundle_dir, images, 0.3))


def test_colour_and_16_bit_pngs_become_8_bit_greyscale(
    client: TestClient, bundle_dir: Path, make_images, score_oracle, results_match
) -> None:
    images = make_images(1, 35)
    grey = images[0, 0]
    rgba = np.stack([grey, grey, grey, np.full_like(grey, 255)], axis=-1)
    response = client.post("/v1/score", content=png_bytes(rgba), headers=PNG)
    results_match(response.json()["results"], score_oracle(bundle_dir, images, 0.1))
    sixteen = png_bytes(grey.astype(np.uint16) * 257)
    assert Image.open(io.BytesIO(sixteen)).mode.startswith("I")
    response = client.post("/v1/score", content=sixteen, headers=PNG)
    assert response.status_code == 200, response.text
    results_match(response.json()["results"], score_oracle(bundle_dir, images, 0.1))


def test_png_errors(client: TestClient, make_images) -> None:
    assert_error(client.post("/v1/score", content=b"\x89PNG broken", headers=PNG), 400, "malformed_png", "PNG")
    assert_error(client.post("/v1/score", content=npy_bytes(np.zeros((1, 28, 28))), headers=PNG), 400, "malformed_png", "not a PNG")
    assert_error(client.post("/v1/score", content=png_bytes(np.zeros((32, 30), np.uint8)), headers=PNG), 422, "invalid_shape", "30x32")
    jpeg = io.BytesIO()
    Image.fromarray(make_images(1, 36)[0, 0]).save(jpeg, format="JPEG")
    assert_error(client.post("/v1/score", content=jpeg.getvalue(), headers=PNG), 400, "malformed_png", "not a PNG")


def multipart(images: np.ndarray, **fields: str) -> dict[str, Any]:
    return {"files": [("images", (f"{index}.png", png_bytes(image[0]), "image/png")) for index, image in enumerate(images)], "data": fields}


def test_multipart_pngs_keep_their_order(client: TestClient, bundle_dir: Path, make_images, score_oracle, results_match) -> None:
    images = make_images(5, 37)
    response = client.post("/v1/score", **multipart(images, alpha="0.25"))
    assert response.status_code == 200, response.text
    assert response.json()["alpha"] == 0.25
    results_match(response.json()["results"], score_oracle(bundle_dir, images, 0.25))
    reversed_response = client.post("/v1/score?alpha=0.25", **multipart(images[::-1]))
    results_match(reversed_response.json()["results"], score_oracle(bundle_dir, images[::-1], 0.25))


def test_multipart_errors(client: TestClient, make_images) -> None:
    images = make_images(2, 38)
    assert_error(client.post("/v1/score", **multipart(images, colour="red")), 422, "invalid_request", "'colour'")
    assert_error(client.post("/v1/score", **multipart(images, alpha="2")), 422, "invalid_alpha", "form field")
    assert_error(client.post("/v1/score", files={"alpha": (None, "0.1")}), 422, "empty_batch")
    assert_error(client.post("/v1/score", **multipart(np.concatenate([images] * 9))), 413, "too_many_instances", "18")
    broken = {"files": [("images", ("a.png", png_bytes(images[0, 0]), "image/png")), ("images", ("b.png", b"junk", "image/png"))]}
    assert_error(client.post("/v1/score", **broken), 400, "malformed_png", "file 1 ('b.png')")
    no_boundary = {"content-type": "multipart/form-data"}
    assert_error(client.post("/v1/score", content=b"--x\r\n", headers=no_boundary), 400, "malformed_multipart")


def test_unsupported_media_type_lists_what_is_accepted(client: TestClient) -> None:
    message = assert_error(client.post("/v1/score", content=b"abc", headers={"content-type": "text/plain"}), 415, "unsupported_media_type")
    for media_type in ("application/json", "application/x-npy", "image/png", "multipart/form-data"):
        assert media_type in message


def test_json_bodies_take_alpha_from_the_query_when_the_body_has_none(client: TestClient, make_images) -> None:
    instances = make_images(1, 39).tolist()
    assert client.post("/v1/score?alpha=0.3", json={"instances": instances}).json()["alpha"] == 0.3
    assert client.post("/v1/score?alpha=0.3", json={"instances": instances, "alpha": 0.2}).json()["alpha"] == 0.2


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((2, 28, 28), np.uint8),
        np.ones((1, 1, 28, 28), ">f4"),
        np.asfortranarray(np.arange(12.0).reshape(3, 4)),
        np.zeros(5, np.int16),
        np.array(3.5),
    ],
)
def test_the_fast_npy_header_reader_agrees_with_numpy(array: np.ndarray) -> None:

    body = npy_bytes(array)
    parsed = fast_npy_header(body)
    assert parsed is not None
    shape, fortran_order, dtype, offset = parsed
    stream = io.BytesIO(body)
    np.lib.format.read_magic(stream)
    assert (shape, fortran_order, dtype) == np.lib.format.read_array_header_1_0(stream) and offset == stream.tell()
    assert np.array_equal(read_npy(body), array) and read_npy(body).dtype == array.dtype


def test_a_huge_declared_shape_is_refused_before_allocation() -> None:

    header = "{'descr': '<f8', 'fortran_order': False, 'shape': (4000000000, 28, 28), }"
    padded = header + " " * (64 - (10 + len(header) + 1) % 64) + "\n"
    body = b"\x93NUMPY\x01\x00" + len(padded).to_bytes(2, "little") + padded.encode() + b"\0" * 64
    with pytest.raises(MalformedInputError) as refused:
        read_npy(body)
    assert as_api_error(refused.value).status_code == 400 and "4000000000" in refused.value.message


@pytest.mark.parametrize(
    ("dtype", "value", "code"),
    [
        (np.int16, -1, "out_of_range"),
        (np.int64, 256, "out_of_range"),
        (np.uint16, 300, "out_of_range"),
        (np.float16, np.inf, "invalid_value"),
    ],
)
def test_integer_and_half_arrays_are_range_checked(client: TestClient, make_images, dtype: Any, value: Any, code: str) -> None:
    array = make_images(2, 46).astype(dtype)
    array[1, 0, 5, 6] = value
    assert_error(client.post("/v1/score", content=npy_bytes(array), headers=NPY), 422, code, "instance 1", "[0, 5, 6]")
