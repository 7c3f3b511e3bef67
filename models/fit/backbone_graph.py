"""Graph surgery on a user's ONNX classifier: find its logits and feature tensors, and compose one serving graph.

The serving graph of a backbone bundle (design.md section 10) is one ONNX model:

    x (N, C, H, W) float32 raw 0..255  --preprocessing-->  the user's graph, unchanged  --> logits (N, K)
                                                                      \\--> features (N, D) --> heads --> scores

The user's graph keeps its nodes and weights; only the feature tensor is exposed as an extra output (and
pooled when it is not 2-D). `source_sha256` records the user's file; the composed graph is a new file.
Large backbones: the composed graph is one protobuf, so the user's model must stay under protobuf's 2 GB
(models with external data files are refused with that message).

Discovery (no question asked of the user unless the graph is ambiguous):
- logits: the graph's 2-D outputs (N, K >= 2); one -> it, several -> the one named `logits`, else refusal;
- features: the first operand of the `Gemm` / `MatMul` producing the logits (through `Add`/`Identity`/
  `Reshape`/`Flatten`); several such operands (e.g. two summed heads) -> refusal listing candidates and shapes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper, shape_inference

from oodserve.bundle.preprocess import PreprocessSpec
from oodserve.models.data import DataError

PASS_THROUGH_OPS = {"Add", "Sub", "Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast"}
LINEAR_OPS = {"Gemm", "MatMul"}
MIN_OPSET = 13


class BackboneError(DataError):
    """The user's model cannot be used as a backbone; the message names the file or tensor and what to do."""


@dataclass(frozen=True)
class BackboneGraph:
    """A loaded user model and what was found in it."""

    model: onnx.ModelProto
    path: Path
    sha256: str
    input_name: str
    input_shape: list[int | str]
    """Per-instance dims of the input (str for symbolic ones)."""
    input_type: int
    logits: str
    classes: int
    features: str
    feature_shape: list[int | str]
    """Per-instance dims of the feature tensor before pooling."""
    pooling: str
    feature_dimension: int


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str] | None:
    if not value_info.type.HasField("tensor_type") or not value_info.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in value_info.type.tensor_type.shape.dim]


def _shape_text(dims: list[int | str] | None) -> str:
    return "unknown" if dims is None else "[" + ", ".join(str(d) for d in dims) + "]"


def load_backbone_model(path: Path) -> onnx.ModelProto:
    """The ONNX model at `path`, checked; BackboneError naming the file otherwise."""
    if not path.is_file():
        raise BackboneError(f"{path}: no such file (the backbone must be an ONNX model file)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - protobuf raises several types for a file that is not ONNX
        raise BackboneError(f"{path}: not a loadable ONNX model: {error}") from error
    if not model.graph.node:
        raise BackboneError(f"{path}: not a loadable ONNX model: the graph has no nodes")
    if any(init.data_location == TensorProto.EXTERNAL for init in model.graph.initializer):
        raise BackboneError(f"{path}: the model keeps weights in external data files; the bundle composes one graph, which "
                            "must fit one protobuf (2 GB): re-save it with the weights inside")
    try:
        onnx.checker.check_model(model)
    except Exception as error:  # noqa: BLE001
        raise BackboneError(f"{path}: not a valid ONNX model: {error}") from error
    return model


def _opset(model: onnx.ModelProto) -> int:
    return next((entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx")), 0)


def inspect_backbone(path: Path, features: str | None = None, logits: str | None = None, pooling: str | None = None) -> BackboneGraph:
    """Load the user's model and find its input, logits and features (see the module docstring)."""
    model = load_backbone_model(path)
    if _opset(model) < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as error:  # noqa: BLE001
            raise BackboneError(f"{path}: opset {_opset(model)} could not be converted to {MIN_OPSET}: {error}") from error
    initializers = {init.name for init in model.graph.initializer}
    inputs = [value for value in model.graph.input if value.name not in initializers]
    if len(inputs) != 1:
        raise BackboneError(f"{path}: the model has {len(inputs)} inputs {[value.name for value in inputs]}; a backbone takes one image "
                            "tensor (fold the others into the graph as constants)")
    try:
        inferred = shape_inference.infer_shapes(model, strict_mode=False)
    except Exception as error:  # noqa: BLE001
        raise BackboneError(f"{path}: shape inference failed: {error}") from error
    shapes: dict[str, list[int | str] | None] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
        shapes[value.name] = _dims(value)
    input_value = inputs[0]
    input_dims = _dims(input_value) or []
    if len(input_dims) != 4:
        raise BackboneError(f"{path}: input {input_value.name!r} has shape {_shape_text(input_dims)}; a backbone takes images "
                            "(N, C, H, W) or (N, H, W, C)")
    producers = {output: node for node in model.graph.node for output in node.output}

    def width(name: str) -> int | None:
        dims = shapes.get(name)
        return dims[1] if dims is not None and len(dims) == 2 and isinstance(dims[1], int) else None

    outputs = [value.name for value in model.graph.output]
    if logits is not None:
        if logits not in shapes and logits not in producers:
            raise BackboneError(f"{path}: --logits {logits!r} is not a tensor of the graph; outputs: "
                                + ", ".join(f"{name} {_shape_text(shapes.get(name))}" for name in outputs))
        logits_name = logits
    else:
        two_d = [name for name in outputs if width(name) is not None and (width(name) or 0) >= 2]
        if len(two_d) == 1:
            logits_name = two_d[0]
        elif "logits" in two_d:
            logits_name = "logits"
        elif not two_d:
            raise BackboneError(f"{path}: no 2-D logits output (N, classes) found; outputs: "
                                + ", ".join(f"{name} {_shape_text(shapes.get(name))}" for name in outputs)
                                + "; name the logits tensor with --logits")
        else:
            raise BackboneError(f"{path}: several 2-D outputs could be the logits: "
                                + ", ".join(f"{name} {_shape_text(shapes.get(name))}" for name in two_d) + "; choose one with --logits")
    classes = width(logits_name)
    if classes is None or classes < 2:
        raise BackboneError(f"{path}: logits tensor {logits_name!r} has shape {_shape_text(shapes.get(logits_name))}; "
                            "logits must be 2-D (N, classes) with at least 2 classes")
    if features is not None:
        if features not in shapes and features not in producers:
            raise BackboneError(f"{path}: --features {features!r} is not a tensor of the graph")
        feature_name = features
    else:
        candidates = _linear_operands(logits_name, producers, initializers)
        if len(candidates) != 1:
            found = candidates or [n for n in outputs if n != logits_name and shapes.get(n) is not None]
            listing = ", ".join(f"{name} {_shape_text(shapes.get(name))}" for name in found) or "none"
            raise BackboneError(f"{path}: cannot tell which tensor holds the features of logits {logits_name!r}: candidates {listing}; "
                                "name one with --features TENSOR")
        feature_name = candidates[0]
    feature_dims = shapes.get(feature_name)
    if feature_dims is None:
        raise BackboneError(f"{path}: the shape of features tensor {feature_name!r} is unknown after shape inference")
    per_instance = feature_dims[1:]
    chosen_pooling = pooling or "none"
    if len(per_instance) != 1 and chosen_pooling == "none":
        raise BackboneError(f"{path}: features tensor {feature_name!r} has shape {_shape_text(feature_dims)}, not 2-D (N, D); "
                            "pool it with --pooling mean (mean over the axes after the channel axis) or --pooling flatten")
    if chosen_pooling == "mean":
        dimension = per_instance[0] if len(per_instance) >= 1 else None
    else:
        static = [d for d in per_instance if isinstance(d, int)]
        dimension = int(np.prod(static)) if len(static) == len(per_instance) else None
    if not isinstance(dimension, int) or dimension < 1:
        raise BackboneError(f"{path}: features tensor {feature_name!r} has shape {_shape_text(feature_dims)}: its width must be static")
    return BackboneGraph(
        model=model, path=path, sha256=file_sha256(path), input_name=input_value.name, input_shape=input_dims[1:],
        input_type=input_value.type.tensor_type.elem_type, logits=logits_name, classes=classes, features=feature_name,
        feature_shape=per_instance, pooling=chosen_pooling, feature_dimension=dimension,
    )


def _linear_operands(tensor: str, producers: dict[str, onnx.NodeProto], initializers: set[str]) -> list[str]:
    """First operands of the Gemm/MatMul nodes feeding `tensor` through pass-through ops (constants skipped)."""
    found: list[str] = []
    stack, seen = [tensor], set()
    while stack:
        name = stack.pop()
        if name in seen or name in initializers or name not in producers:
            continue
        seen.add(name)
        node = producers[name]
        if node.op_type in LINEAR_OPS:
            transposed = any(a.name == "transA" and a.i == 1 for a in node.attribute)
            operand = node.input[0]
            if not transposed and operand not in found and operand not in initializers:
                found.append(operand)
        elif node.op_type in PASS_THROUGH_OPS:
            stack.extend(node.input[:1] if node.op_type in ("Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "Identity")
                         else node.input)
    return found


def check_preprocess(graph: BackboneGraph, spec: PreprocessSpec) -> None:
    """BackboneError when the declared preprocessing does not fit the model's input."""
    expected_type = TensorProto.UINT8 if spec.dtype == "uint8" else TensorProto.FLOAT
    if graph.input_type != expected_type:
        raise BackboneError(f"{graph.path}: input {graph.input_name!r} has element type {TensorProto.DataType.Name(graph.input_type)}, "
                            f"the declared preprocessing gives {spec.dtype}; declare dtype to match")
    declared = spec.model_input_shape()
    for axis, (actual, wanted) in enumerate(zip(graph.input_shape, declared)):
        if isinstance(actual, int) and actual != wanted:
            raise BackboneError(f"{graph.path}: input {graph.input_name!r} has shape {_shape_text(graph.input_shape)} per instance, the "
                                f"declared preprocessing ({spec.layout}, size {list(spec.size)}, {spec.channels} channels) gives "
                                f"{declared} (axis {axis + 1} differs)")


def default_preprocess(graph: BackboneGraph, size: tuple[int, int] | None = None) -> dict[str, object]:
    """What can be read off the model's input: name, layout, dtype, channels and (static) size."""
    dims = graph.input_shape
    channels_first = isinstance(dims[0], int) and dims[0] in (1, 3, 4) and not (isinstance(dims[2], int) and dims[2] in (1, 3, 4))
    layout = "NCHW" if channels_first or not isinstance(dims[2], int) else "NHWC"
    channel_dim, height, width = (dims[0], dims[1], dims[2]) if layout == "NCHW" else (dims[2], dims[0], dims[1])
    if size is None:
        if not (isinstance(height, int) and isinstance(width, int)):
            raise BackboneError(f"{graph.path}: input {graph.input_name!r} has a dynamic size {_shape_text(dims)}; declare the size the "
                                "model takes and how images get there (--preprocess size=224x224 resize=center_crop)")
        size = (height, width)
    values: dict[str, object] = {"input_name": graph.input_name, "layout": layout, "size": list(size),
                                 "channels": channel_dim if isinstance(channel_dim, int) else 3,
                                 "dtype": "uint8" if graph.input_type == TensorProto.UINT8 else "float32"}
    if values["dtype"] == "uint8":
        values["scale"] = 1.0
    return values


def _reduce(op: str, opset: int, source: str, output: str, axes: list[int], keepdims: int, extra: list[onnx.TensorProto]) -> onnx.NodeProto:
    """A Reduce* node with `axes` as attribute or input, as the opset wants (inputs since 13 for ReduceSum, 18 for the rest)."""
    as_input = opset >= (13 if op == "ReduceSum" else 18)
    if as_input:
        name = f"{output}__axes"
        extra.append(numpy_helper.from_array(np.asarray(axes, dtype=np.int64), name))
        return helper.make_node(op, [source, name], [output], keepdims=keepdims)
    return helper.make_node(op, [source], [output], axes=axes, keepdims=keepdims)


def preprocessing_model(spec: PreprocessSpec, opset: int, ir_version: int) -> onnx.ModelProto:
    """x (N, C, H, W) float32 raw 0..255 -> `model_input` in the model's layout and dtype (see `apply_preprocess`)."""
    nodes, inits = [], []
    current = "x"
    if spec.dtype == "uint8":
        inits += [numpy_helper.from_array(np.asarray(0.0, np.float32), "pre_low"),
                  numpy_helper.from_array(np.asarray(255.0, np.float32), "pre_high")]
        nodes += [helper.make_node("Round", [current], ["pre_rounded"]),
                  helper.make_node("Clip", ["pre_rounded", "pre_low", "pre_high"], ["pre_clipped"]),
                  helper.make_node("Cast", ["pre_clipped"], ["pre_cast"], to=TensorProto.UINT8)]
        current = "pre_cast"
    else:
        multiplier = (np.float32(spec.scale) / spec.channel_std()).reshape(1, -1, 1, 1).astype(np.float32)
        offset = (-spec.channel_mean() / spec.channel_std()).reshape(1, -1, 1, 1).astype(np.float32)
        inits += [numpy_helper.from_array(multiplier, "pre_multiplier"), numpy_helper.from_array(offset, "pre_offset")]
        nodes += [helper.make_node("Mul", [current, "pre_multiplier"], ["pre_scaled"]),
                  helper.make_node("Add", ["pre_scaled", "pre_offset"], ["pre_normalised"])]
        current = "pre_normalised"
    nodes.append(helper.make_node("Transpose", [current], ["model_input"], perm=[0, 2, 3, 1]) if spec.layout == "NHWC"
                 else helper.make_node("Identity", [current], ["model_input"]))
    height, width = spec.size
    element = TensorProto.UINT8 if spec.dtype == "uint8" else TensorProto.FLOAT
    graph = helper.make_graph(
        nodes, "preprocess",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", spec.channels, height, width])],
        [helper.make_tensor_value_info("model_input", element, ["N", *spec.model_input_shape()])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model


def exposed_backbone(graph: BackboneGraph) -> onnx.ModelProto:
    """The user's model with the (pooled) features as an extra output `backbone_features` and logits as `backbone_logits`."""
    model = onnx.ModelProto()
    model.CopyFrom(graph.model)
    opset = _opset(model)
    extra: list[onnx.TensorProto] = []
    features = graph.features
    if graph.pooling == "mean":
        rank = len(graph.feature_shape) + 1
        model.graph.node.append(_reduce("ReduceMean", opset, features, "backbone_features_pooled", list(range(2, rank)), 0, extra))
        features = "backbone_features_pooled"
    elif graph.pooling == "flatten":
        model.graph.node.append(helper.make_node("Flatten", [features], ["backbone_features_pooled"], axis=1))
        features = "backbone_features_pooled"
    model.graph.initializer.extend(extra)
    model.graph.node.append(helper.make_node("Cast", [features], ["backbone_features"], to=TensorProto.FLOAT))
    model.graph.node.append(helper.make_node("Cast", [graph.logits], ["backbone_logits"], to=TensorProto.FLOAT))
    del model.graph.output[:]
    model.graph.output.extend([
        helper.make_tensor_value_info("backbone_features", TensorProto.FLOAT, ["N", graph.feature_dimension]),
        helper.make_tensor_value_info("backbone_logits", TensorProto.FLOAT, ["N", graph.classes]),
    ])
    return model


def align(model: onnx.ModelProto, opset: int, ir_version: int) -> onnx.ModelProto:
    """`model` at the default-domain `opset` (converted up when lower) with `ir_version`."""
    if _opset(model) < opset:
        model = onnx.version_converter.convert_version(model, opset)
    model.ir_version = ir_version
    return model


def compose(graph: BackboneGraph, spec: PreprocessSpec, heads: onnx.ModelProto | None) -> onnx.ModelProto:
    """preprocessing -> user's model -> heads, as one model with input `x` and outputs `logits`, `features` and the heads'.

    `heads` takes inputs `features` (N, D) and `logits` (N, K) and must output them again under those names... it may
    be None (the graph then outputs logits and features only)."""
    opset = max(_opset(graph.model), _opset(heads) if heads is not None else 0, MIN_OPSET)
    ir_version = max(graph.model.ir_version, 8)
    backbone = align(exposed_backbone(graph), opset, ir_version)
    pre = preprocessing_model(spec, opset, ir_version)
    prefixed = onnx.compose.add_prefix(backbone, "bb/")
    joined = onnx.compose.merge_models(pre, prefixed, io_map=[("model_input", "bb/" + graph.input_name)])
    if heads is None:
        heads = passthrough_heads(graph.feature_dimension, graph.classes, opset, ir_version)
    heads = align(heads, opset, ir_version)
    composed = onnx.compose.merge_models(
        joined, heads, io_map=[("bb/backbone_features", "features_in"), ("bb/backbone_logits", "logits_in")],
    )
    composed.producer_name = "oodserve fit --backbone"
    return composed


def passthrough_heads(dimension: int, classes: int, opset: int, ir_version: int) -> onnx.ModelProto:
    """Heads graph with no heads: features_in/logits_in -> features/logits."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["features_in"], ["features"]), helper.make_node("Identity", ["logits_in"], ["logits"])],
        "heads",
        [helper.make_tensor_value_info("features_in", TensorProto.FLOAT, ["N", dimension]),
         helper.make_tensor_value_info("logits_in", TensorProto.FLOAT, ["N", classes])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", dimension]),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir_version
    return model
