"""Tiny backbones for the backbone-bundle tests: ONNX classifiers built in milliseconds, with conventions that differ
from the shared ResNet-20 (NHWC uint8 input, a features output, MatMul+Add heads), and images they classify.

The network: a fixed random 3x3 convolution + ReLU, global average pooling, concatenated with the per-channel means
(features (N, 8 + C)), then a linear head fitted by least squares to one-hot labels of `coloured_images` ("trained" in
closed form, so the accuracy check has something to find).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

SIZE = 16
CLASSES = 3
FILTERS = 8
MEAN = (0.5, 0.4, 0.3)
STD = (0.25, 0.2, 0.3)


def coloured_images(count: int, seed: int = 0, size: int = SIZE) -> tuple[np.ndarray, np.ndarray]:
    """(count, 3, size, size) uint8 images whose class (0..2) is the brightest channel, with noise; labels (count,)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count)
    base = rng.uniform(60, 140, (count, 3, 1, 1))
    base[np.arange(count), labels] += 70
    texture = rng.normal(0, 25, (count, 3, size, size))
    return np.clip(base + texture, 0, 255).astype(np.uint8), labels


def _graph(layout: str, dtype: str, head: str, weight: np.ndarray | None, bias: np.ndarray | None, seed: int) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (FILTERS, 3, 3, 3)).astype(np.float32), "conv_w"))
    current = "image"
    if dtype == "uint8":
        nodes.append(helper.make_node("Cast", [current], ["image_f"], to=TensorProto.FLOAT))
        inits.append(numpy_helper.from_array(np.float32(1 / 255), "inv255"))
        nodes.append(helper.make_node("Mul", ["image_f", "inv255"], ["image_scaled"]))
        current = "image_scaled"
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", [current], ["image_nchw"], perm=[0, 3, 1, 2]))
        current = "image_nchw"
    nodes += [
        helper.make_node("Conv", [current, "conv_w"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("GlobalAveragePool", [current], ["channel_means"]),
        helper.make_node("Concat", ["pooled", "channel_means"], ["stacked"], axis=1),
        helper.make_node("Flatten", ["stacked"], ["penultimate"], axis=1),
    ]
    dimension = FILTERS + 3
    outputs = []
    if weight is not None and bias is not None:
        if head == "gemm":
            inits += [numpy_helper.from_array(weight.astype(np.float32), "fc_w"),
                      numpy_helper.from_array(bias.astype(np.float32), "fc_b")]
            nodes.append(helper.make_node("Gemm", ["penultimate", "fc_w", "fc_b"], ["logits"], transB=1))
        elif head in ("matmul_add", "features_output"):
            inits += [numpy_helper.from_array(weight.T.astype(np.float32), "fc_wt"),
                      numpy_helper.from_array(bias.astype(np.float32), "fc_b")]
            nodes += [helper.make_node("MatMul", ["penultimate", "fc_wt"], ["matmul"]),
                      helper.make_node("Add", ["matmul", "fc_b"], ["logits"])]
        elif head == "ambiguous":  # two linear heads summed: which operand holds "the" features?
            half = weight.T.astype(np.float32)
            inits += [numpy_helper.from_array(half, "fc_a"), numpy_helper.from_array(half * 0, "fc_b0"),
                      numpy_helper.from_array(bias.astype(np.float32), "fc_b")]
            nodes += [helper.make_node("Relu", ["penultimate"], ["other_features"]),
                      helper.make_node("MatMul", ["penultimate", "fc_a"], ["part_a"]),
                      helper.make_node("MatMul", ["other_features", "fc_b0"], ["part_b"]),
                      helper.make_node("Add", ["part_a", "part_b"], ["summed"]), helper.make_node("Add", ["summed", "fc_b"], ["logits"])]
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES]))
    if weight is None or head == "features_output":
        outputs.append(helper.make_tensor_value_info("penultimate", TensorProto.FLOAT, ["batch", dimension]))
    shape = ["batch", 3, SIZE, SIZE] if layout == "NCHW" else ["batch", SIZE, SIZE, 3]
    element = TensorProto.UINT8 if dtype == "uint8" else TensorProto.FLOAT
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("image", element, shape)], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def model_input(images: np.ndarray, layout: str, dtype: str) -> np.ndarray:
    """What the tiny model's clients feed it: NCHW float normalised by MEAN/STD, or NHWC uint8 raw."""
    if dtype == "uint8":
        return np.ascontiguousarray(images.transpose(0, 2, 3, 1)) if layout == "NHWC" else images
    mean, std = np.asarray(MEAN, np.float32)[:, None, None], np.asarray(STD, np.float32)[:, None, None]
    normalised = (images.astype(np.float32) / 255 - mean) / std
    return np.ascontiguousarray(normalised.transpose(0, 2, 3, 1)) if layout == "NHWC" else normalised.astype(np.float32)


def tiny_backbone(path: Path, layout: str = "NCHW", dtype: str = "float32", head: str = "gemm", seed: int = 0) -> Path:
    """Write a tiny classifier to `path`; its head is least squares on the features of 600 `coloured_images`."""
    images, labels = coloured_images(600, seed=seed + 100)
    trunk = _graph(layout, dtype, head, None, None, seed)
    session = ort.InferenceSession(trunk.SerializeToString(), providers=["CPUExecutionProvider"])
    features = session.run(["penultimate"], {"image": model_input(images, layout, dtype)})[0].astype(np.float64)
    design = np.hstack([features, np.ones((len(features), 1))])
    targets = np.eye(CLASSES)[labels] * 4.0 - 2.0
    solution, *_ = np.linalg.lstsq(design, targets, rcond=None)
    model = _graph(layout, dtype, head, solution[:-1].T, solution[-1], seed)
    onnx.save_model(model, str(path))
    return path


def write_class_folders(directory: Path, images: np.ndarray, labels: np.ndarray,
                        names: tuple[str, ...] = ("class0", "class1", "class2")) -> Path:
    """Images (N, 3, H, W) uint8 as PNG class folders; class c goes to folder sorted(names)[c]: names are given sorted so the
    folder order is the logits' order."""
    from PIL import Image

    for index, (image, label) in enumerate(zip(images, labels)):
        folder = directory / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.moveaxis(image, 0, -1)).save(folder / f"{index:05d}.png")
    return directory
