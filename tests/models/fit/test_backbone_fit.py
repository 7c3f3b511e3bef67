"""`oodserve fit --backbone` end to end on tiny backbones: the bundle serves the user's predictions with a verdict, keeps
the user's model's hash, refuses bad data with errors that name it, and the accuracy check catches a wrong mean/std."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from oodserve.bundle.preprocess import PreprocessSpec, apply_preprocess, resize_image
from oodserve.bundle.writer import sha256_file
from oodserve.engine import Engine
from oodserve.models.data import DataError
from oodserve.models.fit.backbone import BackboneOptions, auroc, fit_backbone, load_images_for, parse_preprocess, split_calibration
from tests.helpers.backbone_bundles import tiny_backbone_bundle
from tests.helpers.backbones import MEAN, STD, coloured_images, tiny_backbone, write_class_folders

pytestmark = pytest.mark.slow  # fits tiny backbone bundles (several seconds each)


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_backbone_bundle(tmp_path_factory.mktemp("tiny"))


def test_bundle_serves_the_backbone_prediction_and_a_verdict(fitted: Path) -> None:
    manifest = json.loads((fitted / "manifest.json").read_text())
    source = fitted.parent / "model.onnx"
    assert manifest["backbone"]["source_sha256"] == sha256_file(source)
    assert manifest["backbone"]["preprocess"]["layout"] == "NHWC" and manifest["backbone"]["preprocess"]["dtype"] == "uint8"
    assert manifest["backbone"]["features"] == "penultimate" and manifest["provenance"]["calibration_guarantee"] is True
    engine = Engine.load(fitted)
    images, labels = coloured_images(200, seed=9)
    scores = engine.score(images.astype(np.float32))
    user = ort.InferenceSession(str(source), providers=["CPUExecutionProvider"])
    spec = engine.manifest.backbone.preprocess  # type: ignore[union-attr]
    expected = user.run(["logits"], {"image": apply_preprocess(images, spec)})[0].argmax(axis=1)
    np.testing.assert_array_equal(scores.predicted_class, expected)
    assert np.mean(expected == labels) > 0.8
    noise = np.random.default_rng(0).integers(0, 256, (100, 3, 16, 16)).astype(np.float32)
    flagged_in, flagged_noise = scores.is_ood.mean(), engine.score(noise).is_ood.mean()
    assert flagged_in < 0.15 and flagged_noise > 0.9, (flagged_in, flagged_noise)
    assert {"knn_distance", "mahalanobis", "energy", "msp", "vim", "gp_variance", "flow_nll"} <= set(scores.signals)


def test_accuracy_check_catches_a_wrong_mean_and_std(tmp_path: Path) -> None:
    model = tiny_backbone(tmp_path / "m.onnx", layout="NCHW", dtype="float32", head="gemm")
    images, labels = coloured_images(400, seed=1)
    write_class_folders(tmp_path / "train", images, labels)
    held, held_labels = coloured_images(400, seed=2)
    np.savez(tmp_path / "held.npz", x=held, y=held_labels)
    wrong = parse_preprocess(["mean=0.9,0.1,0.5", "std=0.05,0.05,0.05"])
    with pytest.raises(DataError, match=r"accuracy on 400 labelled training images is 0\.[0-3]\d* \(chance 0\.333"):
        fit_backbone(tmp_path / "train", tmp_path / "out", BackboneOptions(backbone=model, calibration=tmp_path / "held.npz",
                                                                          preprocess=wrong, flow_seconds=0), name="b")
    assert not (tmp_path / "out").exists()
    right = parse_preprocess([f"mean={','.join(map(str, MEAN))}", f"std={','.join(map(str, STD))}"])
    fit_backbone(tmp_path / "train", tmp_path / "out", BackboneOptions(backbone=model, calibration=tmp_path / "held.npz",
                                                                      preprocess=right, flow_seconds=0), name="b")
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_bad_data_is_refused_naming_it(tmp_path: Path) -> None:
    model = tiny_backbone(tmp_path / "m.onnx", layout="NHWC", dtype="uint8", head="features_output")
    images, labels = coloured_images(400, seed=1)
    write_class_folders(tmp_path / "train", images, labels)
    options = BackboneOptions(backbone=model, flow_seconds=0)
    with pytest.raises(DataError, match="no --calibration data.*--calibrate-on-training-data"):
        fit_backbone(tmp_path / "train", tmp_path / "out", options, name="b")
    np.savez(tmp_path / "grey.npz", x=images[:, 0], y=labels)
    with pytest.raises(DataError, match=r"grey.npz: images have 1 channel\(s\), the model's input 'image' takes 3"):
        fit_backbone(tmp_path / "train", tmp_path / "out", BackboneOptions(backbone=model, calibration=tmp_path / "grey.npz"), name="b")
    two = labels % 2
    np.savez(tmp_path / "two.npz", x=images, y=two)
    with pytest.raises(DataError, match=r"two.npz: 2 classes.*logits 'logits' have 3 columns"):
        fit_backbone(tmp_path / "two.npz", tmp_path / "out", BackboneOptions(backbone=model, calibration=tmp_path / "two.npz"), name="b")
    big = np.repeat(np.repeat(images, 2, axis=2), 2, axis=3)
    np.savez(tmp_path / "big.npz", x=big, y=labels)
    with pytest.raises(DataError, match=r"big.npz: images are 32x32, the model takes 16x16; declare --preprocess resize"):
        fit_backbone(tmp_path / "train", tmp_path / "out", BackboneOptions(backbone=model, calibration=tmp_path / "big.npz"), name="b")
    assert not (tmp_path / "out").exists()


def test_training_data_only_fits_with_the_guarantee_marked_off(tmp_path: Path) -> None:
    model = tiny_backbone(tmp_path / "m.onnx", layout="NHWC", dtype="uint8", head="features_output")
    images, labels = coloured_images(900, seed=1)
    np.savez(tmp_path / "train.npz", x=images, y=labels)
    fit_backbone(tmp_path / "train.npz", tmp_path / "out", BackboneOptions(backbone=model, calibrate_on_training_data=True,
                                                                          flow_seconds=0), name="b")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["provenance"]["calibration_guarantee"] is False
    assert "TRAINING" in manifest["provenance"]["data"]


def test_fast_auroc_equals_sklearn_with_ties() -> None:
    from sklearn.metrics import roc_auc_score


    rng = np.random.default_rng(0)
    for _ in range(20):
        inside, outside = np.round(rng.normal(0, 1, 300), 1), np.round(rng.normal(0.4, 1.2, 170), 1)
        expected = roc_auc_score(np.r_[np.zeros(300), np.ones(170)], np.r_[inside, outside])
        assert auroc(inside, outside) == pytest.approx(expected, abs=1e-12)


def test_calibration_splits_are_disjoint_and_stratified() -> None:

    labels = np.repeat(np.arange(10), 500)
    signal, fusion, validation = split_calibration(len(labels), labels, seed=3)
    assert (len(signal), len(fusion), len(validation)) == (2000, 2000, 1000)
    assert len(np.unique(np.concatenate([signal, fusion, validation]))) == 5000
    for part, size in ((signal, 200), (fusion, 200), (validation, 100)):
        assert np.all(np.abs(np.bincount(labels[part], minlength=10) - size) <= 1)


def test_preprocess_flags_parse_and_bad_values_name_the_flag(tmp_path: Path) -> None:
    assert parse_preprocess(["mean=0.5,0.4,0.3", "scale=1/255", "size=224x200", "layout=NHWC"]) == {
        "mean": [0.5, 0.4, 0.3], "scale": pytest.approx(1 / 255), "size": [224, 200], "layout": "NHWC"}
    with pytest.raises(DataError, match="--preprocess"):
        parse_preprocess(["mean=red"])
    (tmp_path / "pre.json").write_text('{"std": [0.2, 0.2, 0.2]}')
    assert parse_preprocess([str(tmp_path / "pre.json")]) == {"std": [0.2, 0.2, 0.2]}


def test_large_images_of_mixed_sizes_are_read_at_the_model_size(tmp_path: Path) -> None:
    from PIL import Image


    images, labels = coloured_images(6, seed=4, size=80)
    for index, (image, label) in enumerate(zip(images, labels)):
        folder = tmp_path / "photos" / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray(image.transpose(1, 2, 0))
        (picture if index % 2 else picture.resize((100, 70))).save(folder / f"{index}.png")
    spec = PreprocessSpec(input_name="image", size=(16, 16), resize="resize")
    loaded = load_images_for(tmp_path / "photos", spec, "training data")
    assert loaded.images.shape == (6, 3, 16, 16) and loaded.class_names is not None
    first = sorted((tmp_path / "photos" / loaded.class_names[0]).iterdir())[0]
    with Image.open(first) as picture:
        expected = resize_image(np.moveaxis(np.asarray(picture.convert("RGB")), -1, 0), (16, 16), "resize")
    np.testing.assert_array_equal(loaded.images[0], expected)
    with pytest.raises(DataError, match="declare --preprocess resize"):
        load_images_for(tmp_path / "photos", PreprocessSpec(input_name="image", size=(16, 16)), "training data")


def test_clients_with_features_get_the_same_verdict_from_the_features_bundle(fitted: Path) -> None:
    images_engine = Engine.load(fitted)
    features_engine = Engine.load(fitted.with_name(fitted.name + "-features"))
    images, _ = coloured_images(50, seed=21)
    outputs = images_engine.runner.run(images.astype(np.float32))
    from_images = images_engine.score_model_outputs(images.astype(np.float32), outputs)
    from_features = features_engine.score(outputs["backbone"]["features"])
    np.testing.assert_array_equal(from_features.predicted_class, from_images.predicted_class)
    np.testing.assert_allclose(from_features.fused_p_value, from_images.fused_p_value, atol=2e-3)
    assert features_engine.manifest.input.shape == [11] and features_engine.manifest.fusion == images_engine.manifest.fusion


def test_training_images_passed_as_calibration_are_refused(tmp_path: Path) -> None:
    model = tiny_backbone(tmp_path / "m.onnx", layout="NHWC", dtype="uint8", head="features_output")
    images, labels = coloured_images(600, seed=1)
    np.savez(tmp_path / "train.npz", x=images, y=labels)
    np.savez(tmp_path / "mixed.npz", x=np.concatenate([images[:500], coloured_images(300, seed=5)[0]]),
             y=np.concatenate([labels[:500], coloured_images(300, seed=5)[1]]))
    with pytest.raises(DataError, match=r"mixed.npz: 62% of the calibration images have the features of a training image"):
        fit_backbone(tmp_path / "train.npz", tmp_path / "out", BackboneOptions(backbone=model, calibration=tmp_path / "mixed.npz",
                                                                              flow_seconds=0), name="b")
