"""`oodserve fit` on images: tiny RGB and greyscale bundles fitted in seconds from a class-folder tree of PNG
files and from an unlabelled .npz, served by the real app in every body layout (JSON channels-first and
channels-last, .npy, PNG, v2); bad image data refused naming the file."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from oodserve.bundle.loader import BundleError
from oodserve.config import Settings
from oodserve.engine import Engine
from oodserve.models.data import DataError, load_image_dataset
from oodserve.models.fit.run import FitSettings, fit
from oodserve.runtime.sessions import RuntimeOptions
from oodserve.scoring.signals import input_complexity
from oodserve.server.app import create_app

SIDE = 8


def coloured_squares(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """RGB images (count, 8, 8, 3): a bright square of one of two colours on a dark noisy background."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, count)
    images = rng.integers(0, 40, (count, SIDE, SIDE, 3))
    colours = np.array([[220, 40, 40], [40, 40, 220]])
    for index, label in enumerate(labels):
        top, left = rng.integers(0, 4, 2)
        images[index, top : top + 4, left : left + 4] = colours[label]
    return images.astype(np.uint8), labels


@pytest.fixture(scope="module")
def rgb_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("rgb")
    images, labels = coloured_squares(260, seed=0)
    for name in ("red", "blue"):
        (directory / "data" / name).mkdir(parents=True)
    for index, (image, label) in enumerate(zip(images, labels)):
        enlarged = np.kron(image, np.ones((2, 2, 1), dtype=np.uint8))  # 16x16 files, resized back to 8x8 by --resize
        Image.fromarray(enlarged).save(directory / "data" / ["red", "blue"][label] / f"{index}.png")
    result = fit(FitSettings(data=directory / "data", out=directory / "squares", minutes=0.4, resize=f"{SIDE}x{SIDE}"))
    return result.bundle


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def test_a_class_folder_of_rgb_pngs_fits_into_a_bundle_served_in_every_layout(rgb_bundle: Path) -> None:
    manifest = json.loads((rgb_bundle / "manifest.json").read_text())
    assert manifest["input"]["shape"] == [3, SIDE, SIDE] and manifest["labels"] == ["blue", "red"]
    assert set(manifest["models"]) == {"flow", "background", "sngp"} and manifest["sampler"]["latent_shape"] == [3 * SIDE * SIDE]
    complexity = next(signal for signal in manifest["signals"] if signal["kind"] == "input_complexity")
    assert complexity["params"]["codec"].startswith("PNG, Pillow")
    images, _ = coloured_squares(4, seed=9)
    with TestClient(create_app(Settings(bundle=rgb_bundle, warmup_batch_size=2))) as client:
        last = client.post("/v1/score", json={"instances": images.tolist()})  # channels-last, as PIL holds images
        first = client.post("/v1/score", json={"instances": np.moveaxis(images, -1, 1).tolist()})
        as_png = client.post("/v1/score", content=png(images[0]), headers={"content-type": "image/png"})
        grey_png = client.post("/v1/score", content=png(images[0, :, :, 0]), headers={"content-type": "image/png"})
        wrong = client.post("/v1/score", json={"instances": [np.zeros((SIDE, SIDE)).tolist()]})
        described = client.get("/v1/models/squares").json()
        v2 = client.post("/v2/models/squares/infer", json={"inputs": [
            {"name": "x", "shape": [1, SIDE, SIDE, 3], "datatype": "UINT8", "data": images[:1].reshape(-1).tolist()}]})
        sample = client.post("/v1/models/squares/sample", json={"n": 4}, headers={"accept": "application/json"})
        grid = client.post("/v1/models/squares/sample", json={"n": 4})
    assert last.status_code == first.status_code == as_png.status_code == grey_png.status_code == 200, last.text
    assert [r["score"] for r in last.json()["results"]] == pytest.approx([r["score"] for r in first.json()["results"]])
    assert as_png.json()["results"][0]["score"] == pytest.approx(first.json()["results"][0]["score"])
    assert wrong.status_code == 422 and "[3, 8, 8] or [8, 8, 3]" in wrong.json()["error"]["message"]
    assert described["accepted_instance_shapes"] == [[3, SIDE, SIDE], [SIDE, SIDE, 3]]
    assert v2.status_code == 200 and v2.json()["outputs"][0]["name"] == "is_ood"
    assert sample.status_code == 200 and np.asarray(sample.json()["samples"]).shape == (4, 3, SIDE, SIDE)
    assert Image.open(io.BytesIO(grid.content)).mode == "RGB"


def test_image_and_vector_bundles_are_served_side_by_side(rgb_bundle: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    np.save(tmp_path / "rows.npy", rng.normal(size=(300, 4)))
    vectors = fit(FitSettings(data=tmp_path / "rows.npy", out=tmp_path / "rows", minutes=0.1)).bundle
    images, _ = coloured_squares(2, seed=4)
    with TestClient(create_app(Settings(bundle=rgb_bundle, extra_bundles=[vectors], warmup_batch_size=2))) as client:
        served = {model["name"]: model["input"]["shape"] for model in client.get("/v1/models").json()["models"]}
        image_answer = client.post("/v1/models/squares/score", json={"instances": images.tolist()})
        vector_answer = client.post("/v1/models/rows/score", json={"instances": rng.normal(size=(3, 4)).tolist()})
        crossed = client.post("/v1/models/rows/score", json={"instances": images.tolist()})
    assert served == {"squares": [3, SIDE, SIDE], "rows": [4]}
    assert image_answer.status_code == vector_answer.status_code == 200 and crossed.status_code == 422


def test_an_unlabelled_greyscale_npz_fits_without_a_classifier(tmp_path: Path) -> None:
    images, _ = coloured_squares(240, seed=1)
    np.savez(tmp_path / "grey.npz", x=images[..., 0])
    result = fit(FitSettings(data=tmp_path / "grey.npz", out=tmp_path / "grey", minutes=0.3))
    assert result.manifest["input"]["shape"] == [1, SIDE, SIDE] and result.manifest["classifier"] is None
    assert "sngp" not in result.manifest["models"] and "feature_density" not in {s["name"] for s in result.manifest["signals"]}
    with TestClient(create_app(Settings(bundle=result.bundle, warmup_batch_size=2))) as client:
        answer = client.post("/v1/score", json={"instances": images[:2, ..., 0].tolist()})
    assert answer.status_code == 200 and "prediction" not in answer.json()["results"][0]


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda path: np.save(path / "big.npy", np.zeros((300, 100, 100), np.uint8)), "100x100 pixels"),
        (lambda path: np.save(path / "few.npy", np.zeros((50, 16, 16), np.uint8)), "50 images"),
        (lambda path: np.save(path / "float.npy", np.full((300, 16, 16), 0.5)), "whole numbers"),
        (lambda path: np.save(path / "channels.npy", np.zeros((300, 16, 16, 5), np.uint8)), "1 or 3 channels"),
    ],
)
def test_bad_image_data_is_refused_naming_the_file(tmp_path: Path, make, message: str) -> None:
    make(tmp_path)
    (path,) = list(tmp_path.iterdir())
    with pytest.raises(DataError) as refused:
        load_image_dataset(path)
    assert str(path) in str(refused.value) and message in str(refused.value)


def test_image_folders_of_mixed_sizes_need_resize(tmp_path: Path) -> None:
    for index in range(3):
        Image.fromarray(np.zeros((10 + index, 12), np.uint8)).save(tmp_path / f"{index}.png")
    with pytest.raises(DataError, match="different sizes.*--resize"):
        load_image_dataset(tmp_path)


def test_a_machine_whose_png_encoder_codes_differently_is_refused_unless_allowed(
    rgb_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:

    manifest = json.loads((rgb_bundle / "manifest.json").read_text())
    complexity = next(signal for signal in manifest["signals"] if signal["kind"] == "input_complexity")
    assert complexity["params"]["parameters_file"] == input_complexity.CODEC_FILE and "zlib" in complexity["params"]["codec"]
    Engine.load(rgb_bundle)  # this machine fitted it: the reference lengths agree
    real = input_complexity.png_length_bits
    monkeypatch.setattr(input_complexity, "png_length_bits", lambda images: real(images) + 8.0)  # one byte longer each
    with pytest.raises(BundleError, match="PNG encoder here .* OODSERVE_ALLOW_CODEC_MISMATCH"):
        Engine.load(rgb_bundle)
    with caplog.at_level("WARNING", logger="oodserve.engine"):
        Engine.load(rgb_bundle, RuntimeOptions(allow_codec_mismatch=True))
    assert "served anyway" in caplog.text
