"""Backbone graph surgery: feature and logits discovery on several graph shapes, refusals that name the tensor or file,
and the composed graph's preprocessing against its numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from oodserve.bundle.preprocess import PreprocessSpec, apply_preprocess, fit_to_size
from oodserve.models.fit.backbone import settle_preprocess
from oodserve.models.fit.backbone_graph import BackboneError, compose, inspect_backbone, preprocessing_model
from tests.helpers.backbones import MEAN, STD, coloured_images, model_input, tiny_backbone


@pytest.mark.parametrize("head", ["gemm", "matmul_add", "features_output"])
def test_features_found_as_the_input_of_the_linear_layer(tmp_path: Path, head: str) -> None:
    graph = inspect_backbone(tiny_backbone(tmp_path / "m.onnx", head=head))
    assert (graph.features, graph.logits, graph.classes, graph.feature_dimension) == ("penultimate", "logits", 3, 11)


def test_ambiguous_graph_is_refused_with_candidates_and_shapes(tmp_path: Path) -> None:
    path = tiny_backbone(tmp_path / "m.onnx", head="ambiguous")
    with pytest.raises(BackboneError, match=r"candidates other_features \[batch, 11\], penultimate \[batch, 11\].*--features"):
        inspect_backbone(path)
    assert inspect_backbone(path, features="other_features").features == "other_features"


def test_not_an_onnx_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"this is not a protobuf")
    with pytest.raises(BackboneError, match="broken.onnx: not a loadable ONNX model"):
        inspect_backbone(path)


def _save(tmp_path: Path, nodes: list, inputs: list, outputs: list) -> Path:
    model = helper.make_model(helper.make_graph(nodes, "g", inputs, outputs), opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "g.onnx"
    onnx.save_model(model, str(path))
    return path


def test_several_inputs_and_no_logits_are_refused(tmp_path: Path) -> None:
    image = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3, 8, 8])
    other = helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3, 8, 8])
    out = helper.make_tensor_value_info("c", TensorProto.FLOAT, ["N", 3, 8, 8])
    with pytest.raises(BackboneError, match=r"2 inputs \['a', 'b'\]"):
        inspect_backbone(_save(tmp_path, [helper.make_node("Add", ["a", "b"], ["c"])], [image, other], [out]))
    with pytest.raises(BackboneError, match=r"no 2-D logits output.*c \[N, 3, 8, 8\].*--logits"):
        inspect_backbone(_save(tmp_path, [helper.make_node("Relu", ["a"], ["c"])], [image], [out]))


def test_features_that_are_not_2d_need_pooling(tmp_path: Path) -> None:
    path = tiny_backbone(tmp_path / "m.onnx")
    with pytest.raises(BackboneError, match=r"features tensor 'relu' has shape \[batch, 8, 16, 16\].*--pooling mean"):
        inspect_backbone(path, features="relu")
    pooled = inspect_backbone(path, features="relu", pooling="mean")
    assert pooled.feature_dimension == 8
    spec = PreprocessSpec(input_name="image", size=(16, 16), mean=list(MEAN), std=list(STD))
    session = ort.InferenceSession(compose(pooled, spec, None).SerializeToString(), providers=["CPUExecutionProvider"])
    images, _ = coloured_images(4)
    features = session.run(["features"], {"x": images.astype(np.float32)})[0]
    trunk = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    # the pooled ReLU maps are the first 8 features of the model's own penultimate layer
    model = onnx.load(str(path))
    model.graph.output.append(helper.make_tensor_value_info("penultimate", TensorProto.FLOAT, ["batch", 11]))
    trunk = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = trunk.run(["penultimate"], {"image": model_input(images, "NCHW", "float32")})[0][:, :8]
    np.testing.assert_allclose(features, reference, rtol=1e-5, atol=1e-6)


def test_dynamic_size_needs_a_declared_size(tmp_path: Path) -> None:

    image = helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 3, "H", "W"])
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])
    nodes = [helper.make_node("GlobalAveragePool", ["a"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "w"], ["logits"])]
    weight = onnx.numpy_helper.from_array(np.eye(3, dtype=np.float32), "w")
    model = helper.make_model(helper.make_graph(nodes, "g", [image], [logits], [weight]),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "dynamic.onnx"
    onnx.save_model(model, str(path))
    graph = inspect_backbone(path)
    with pytest.raises(BackboneError, match="dynamic size.*size=224x224"):
        settle_preprocess(graph, {})
    assert settle_preprocess(graph, {"size": [20, 24], "resize": "resize"}).size == (20, 24)


@pytest.mark.parametrize("layout,dtype", [("NCHW", "float32"), ("NHWC", "float32"), ("NHWC", "uint8"), ("NCHW", "uint8")])
def test_preprocessing_graph_matches_numpy(layout: str, dtype: str) -> None:
    values = {"mean": list(MEAN), "std": list(STD)} if dtype == "float32" else {"scale": 1.0}
    spec = PreprocessSpec(input_name="image", layout=layout, dtype=dtype, size=(16, 16), **values)
    session = ort.InferenceSession(preprocessing_model(spec, 17, 8).SerializeToString(), providers=["CPUExecutionProvider"])
    images, _ = coloured_images(5)
    graph_output = session.run(["model_input"], {"x": images.astype(np.float32)})[0]
    reference = apply_preprocess(images, spec)
    assert graph_output.dtype == reference.dtype and graph_output.shape == reference.shape
    np.testing.assert_allclose(graph_output, reference, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(reference, model_input(images, layout, dtype), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout,dtype", [("NCHW", "float32"), ("NHWC", "uint8")])
def test_composed_logits_equal_the_user_model_on_numpy_preprocessed_input(tmp_path: Path, layout: str, dtype: str) -> None:
    path = tiny_backbone(tmp_path / "m.onnx", layout=layout, dtype=dtype, head="features_output" if dtype == "uint8" else "gemm")
    graph = inspect_backbone(path)
    values = {"mean": list(MEAN), "std": list(STD)} if dtype == "float32" else {"scale": 1.0}
    spec = PreprocessSpec(input_name="image", layout=layout, dtype=dtype, size=(16, 16), **values)
    composed = ort.InferenceSession(compose(graph, spec, None).SerializeToString(), providers=["CPUExecutionProvider"])
    user = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images, _ = coloured_images(6)
    logits = composed.run(["logits"], {"x": images.astype(np.float32)})[0]
    expected = user.run(["logits"], {"image": apply_preprocess(images, spec)})[0]
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


def test_declared_resize_and_centre_crop_bring_any_size_to_the_model() -> None:
    spec = PreprocessSpec(input_name="image", size=(16, 16), resize="center_crop", crop_fraction=0.5)
    image = np.zeros((3, 40, 60), np.uint8)
    image[:, 10:30, 20:40] = 200  # the centre square survives the crop
    cropped = fit_to_size(image, spec)
    assert cropped.shape == (3, 16, 16) and cropped[:, 4:12, 4:12].min() == 200
    with pytest.raises(ValueError, match="declares no resize"):
        fit_to_size(image, PreprocessSpec(input_name="image", size=(16, 16)))
