"""The Open Inference Protocol v2 tensor codec: infer requests (JSON or the binary tensor data extension
that tritonclient[http] uses) to validated image batches, scored batches to infer responses, and model
metadata. Every problem with a request is a 400 naming the field."""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import Response

from oodserve.bundle.manifest import InputSpec
from oodserve.dataplane import checked_alpha
from oodserve.engine import Engine
from oodserve.scoring.arrays import check_batch_shape, check_image_array
from oodserve.scoring.pipeline import BatchScores
from oodserve.server.body import json_type_name
from oodserve.server.errors import ApiError

INPUT_NAME = "x"
"""The one input tensor of every served model (the ONNX input name convention)."""
INPUT_DATATYPES: dict[str, np.dtype[Any]] = {"UINT8": np.dtype(np.uint8), "FP32": np.dtype("<f4")}
OUTPUT_DTYPES: dict[str, np.dtype[Any]] = {"BOOL": np.dtype(np.bool_), "FP64": np.dtype("<f8"), "INT64": np.dtype("<i8")}
FIXED_OUTPUTS = (("is_ood", "BOOL"), ("p_value", "FP64"), ("score", "FP64"))
HEADER_LENGTH = "inference-header-content-length"
REQUEST_KEYS = ("id", "parameters", "inputs", "outputs")
TENSOR_KEYS = ("name", "shape", "datatype", "parameters", "data")


_OUTPUT_SPECS: weakref.WeakKeyDictionary[Engine, tuple[tuple[str, str], ...]] = weakref.WeakKeyDictionary()
"""output_specs per engine: derived from its manifest once, not per request (weak: a reloaded engine is dropped)."""


def output_specs(engine: Engine) -> tuple[tuple[str, str], ...]:
    """(name, datatype) of every output tensor: verdict, fused p-value and score, each signal, class_index."""
    specs = _OUTPUT_SPECS.get(engine)
    if specs is None:
        specs = _OUTPUT_SPECS[engine] = _derive_output_specs(engine)
    return specs


def _derive_output_specs(engine: Engine) -> tuple[tuple[str, str], ...]:
    specs = list(FIXED_OUTPUTS)
    taken = {name for name, _ in specs}
    specs += [(name, "FP64") for name in engine.reported_signals if name not in taken]
    if engine.manifest.classifier is not None and "class_index" not in {name for name, _ in specs}:
        specs.append(("class_index", "INT64"))
    return tuple(specs)


def output_arrays(engine: Engine, scores: BatchScores) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (datatype, (N,) array) for every output tensor of a scored batch."""
    values: dict[str, np.ndarray] = {"is_ood": scores.is_ood, "p_value": scores.fused_p_value, "score": scores.fused_score}
    values.update({name: array for name, array in scores.signals.items() if name not in values})
    if scores.predicted_class is not None and "class_index" not in values:
        values["class_index"] = scores.predicted_class
    return {name: (datatype, np.asarray(values[name], dtype=OUTPUT_DTYPES[datatype])) for name, datatype in output_specs(engine)}


def model_metadata(engine: Engine) -> dict[str, Any]:
    spec = engine.manifest.input
    return {
        "name": engine.name,
        "versions": [engine.version],
        "platform": "onnxruntime_onnx",
        "inputs": [{"name": INPUT_NAME, "datatype": "UINT8" if spec.dtype == "uint8" else "FP32", "shape": [-1, *spec.shape]}],
        "outputs": [{"name": name, "datatype": datatype, "shape": [-1]} for name, datatype in output_specs(engine)],
        "parameters": {
            "accepted_datatypes": "UINT8,FP32",
            "default_alpha": engine.default_alpha,
            **({"feature_names": ",".join(spec.features)} if spec.features is not None else {}),
        },
    }


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A parsed infer request: id, images (N, *input_shape) float32, alpha, which outputs and how."""

    id: str | None
    images: np.ndarray
    alpha: float | None
    outputs: tuple[RequestedOutput, ...] | None
    binary_outputs: bool


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_request", message)


# ---- shared by the REST and gRPC forms of the protocol ----


def alpha_parameter(value: Any, text_allowed: bool = False) -> float | None:
    """The request parameter `alpha`: None when absent, else a number in (0, 1) (numeric text too where the
    transport only has string parameters, as some gRPC clients send)."""
    if value is None:
        return None
    if text_allowed and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    level = checked_alpha(value)
    if level is None:
        raise _bad(f"parameter `alpha` must be a number in (0, 1), got {value!r}")
    return level


def input_dtype(name: Any, datatype: Any) -> np.dtype[Any]:
    """The input tensor's dtype, once its name and datatype are the model's."""
    if name != INPUT_NAME:
        raise _bad(f"unknown input {name!r}; this model takes one input named {INPUT_NAME!r}")
    if datatype not in INPUT_DATATYPES:
        raise _bad(f"input datatype must be one of {list(INPUT_DATATYPES)}, got {datatype!r}")
    return INPUT_DATATYPES[datatype]


def input_count(shape: Sequence[int], spec: InputSpec, max_instances: int) -> int:
    """The number of values of a declared input shape that fits the model (checked before any array is built)."""
    if any(dim < 0 for dim in shape):
        raise _bad(f"input shape must hold non-negative sizes, got {list(shape)}")
    check_batch_shape(list(shape), spec.shape, max_instances)
    return math.prod(shape)


def raw_tensor(raw: bytes, dtype: np.dtype[Any], count: int, what: str) -> np.ndarray:
    """`count` little-endian values of `dtype` from raw tensor bytes, which must be exactly that long."""
    if len(raw) != count * dtype.itemsize:
        raise _bad(f"{what} is {len(raw)} bytes; {count} values of {dtype.str} need {count * dtype.itemsize}")
    return np.frombuffer(raw, dtype=dtype, count=count)


def typed_tensor(values: np.ndarray, datatype: str) -> np.ndarray:
    """Numbers sent as JSON or typed protobuf contents -> the datatype's array; UINT8 must hold integers in [0, 255]."""
    if datatype == "UINT8" and values.size and (
        values.dtype.kind == "f" and not np.all(values == np.floor(values)) or values.min() < 0 or values.max() > 255
    ):
        raise _bad("UINT8 input data must be integers in [0, 255]")
    return values.astype(INPUT_DATATYPES[datatype])


def check_output_name(name: str, available: Sequence[str]) -> str:
    if name not in available:
        raise _bad(f"unknown output {name!r}; outputs are {list(available)}")
    return name


def _parameters(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{where} `parameters` must be an object, got {json_type_name(value)}")
    return value


def _flag(parameters: dict[str, Any], key: str, where: str) -> bool:
    value = parameters.get(key, False)
    if not isinstance(value, bool):
        raise _bad(f"{where} parameter `{key}` must be a boolean, got {value!r}")
    return value


def _tensor_shape(value: Any) -> list[int]:
    if not isinstance(value, list) or not all(isinstance(dim, int) and not isinstance(dim, bool) and dim >= 0 for dim in value):
        raise _bad(f"input `shape` must be an array of non-negative integers, got {value!r}")
    return value


def _json_tensor_data(data: Any, datatype: str, count: int) -> np.ndarray:
    """Flat or nested JSON data -> a flat numeric array of `count` values of the declared datatype."""
    if not isinstance(data, list):
        raise _bad(f"input `data` must be an array of numbers, got {json_type_name(data)}")
    try:
        values = np.array(data)
    except ValueError as error:
        raise _bad(f"input `data` is ragged or not numeric: {error}") from error
    if values.size == 0 and count == 0:
        return np.zeros(0, dtype=INPUT_DATATYPES[datatype])
    if values.dtype.kind not in "iuf":
        raise _bad(
            f"input `data` must hold only numbers for datatype {datatype}, "
            f"got {values.dtype.kind!r}-kind values (booleans, strings or null?)"
        )
    if values.size != count:
        raise _bad(f"input `shape` holds {count} values but `data` has {values.size}")
    return typed_tensor(values.reshape(-1), datatype)


def parse_infer_request(
    body: bytes, header_length: str | None, spec: InputSpec, max_instances: int, available_outputs: Sequence[str]
) -> InferRequest:
    """Decode an infer body: JSON only, or (binary tensor extension) a JSON header of `header_length`
    bytes followed by the raw tensor bytes. Every problem is a 400 naming the field."""
    binary = b""
    header = body
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError as error:
            raise _bad(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from error
        if not 0 < length <= len(body):
            raise _bad(f"Inference-Header-Content-Length is {length} but the body has {len(body)} bytes")
        header, binary = body[:length], body[length:]
    if not header.strip():
        raise _bad("request body is empty; expected a JSON object with `inputs`")
    try:
        payload = orjson.loads(header)
    except orjson.JSONDecodeError as error:
        raise _bad(f"request is not valid JSON: {error}") from error
    if not isinstance(payload, dict):
        raise _bad(f"request must be a JSON object with `inputs`, got {json_type_name(payload)}")
    unknown = sorted(key for key in payload if key not in REQUEST_KEYS)
    if unknown:
        raise _bad(f"unknown request fields {unknown}; allowed: {list(REQUEST_KEYS)}")
    request_id = payload.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise _bad(f"`id` must be a string, got {json_type_name(request_id)}")
    parameters = _parameters(payload.get("parameters"), "request")
    level = alpha_parameter(parameters.get("alpha"))
    binary_outputs = _flag(parameters, "binary_data_output", "request")

    inputs = payload.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1:
        raise _bad(f"`inputs` must be an array of exactly one tensor named {INPUT_NAME!r}")
    tensor = inputs[0]
    if not isinstance(tensor, dict):
        raise _bad(f"each input must be an object, got {json_type_name(tensor)}")
    unknown = sorted(key for key in tensor if key not in TENSOR_KEYS)
    if unknown:
        raise _bad(f"unknown input fields {unknown}; allowed: {list(TENSOR_KEYS)}")
    dtype = input_dtype(tensor.get("name"), tensor.get("datatype"))
    datatype = str(tensor["datatype"])
    shape = _tensor_shape(tensor.get("shape"))
    count = input_count(shape, spec, max_instances)
    tensor_parameters = _parameters(tensor.get("parameters"), "input")
    binary_size = tensor_parameters.get("binary_data_size")
    if binary_size is not None:
        if "data" in tensor:
            raise _bad("an input has both `data` and parameter `binary_data_size`; send one")
        if isinstance(binary_size, bool) or not isinstance(binary_size, int) or binary_size != count * dtype.itemsize:
            expected = count * dtype.itemsize
            raise _bad(f"input of shape {shape} and datatype {datatype} needs binary_data_size {expected}, got {binary_size!r}")
        values = raw_tensor(binary, dtype, count, "binary tensor data after the JSON header")
    else:
        if binary:
            raise _bad(f"{len(binary)} bytes follow the JSON header but no input declares binary_data_size")
        if "data" not in tensor:
            raise _bad("the input needs `data` (or parameter `binary_data_size` with binary tensor data)")
        values = _json_tensor_data(tensor["data"], datatype, count)
    images = check_image_array(values.reshape(shape), spec.shape, spec.dtype, spec.min, spec.max, max_instances)

    outputs = None
    requested = payload.get("outputs")
    if requested is not None:
        if not isinstance(requested, list):
            raise _bad(f"`outputs` must be an array of {{\"name\": ...}} objects, got {json_type_name(requested)}")
        chosen = []
        for item in requested:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise _bad(f"each requested output must be an object with a string `name`, got {item!r}")
            check_output_name(item["name"], available_outputs)
            output_parameters = _parameters(item.get("parameters"), f"output {item['name']!r}")
            binary_flag = output_parameters.get("binary_data", binary_outputs)
            if not isinstance(binary_flag, bool):
                raise _bad(f"output parameter `binary_data` must be a boolean, got {binary_flag!r}")
            chosen.append(RequestedOutput(item["name"], binary_flag))
        outputs = tuple(chosen)
    return InferRequest(request_id, images, level, outputs, binary_outputs)


def infer_response(engine: Engine, scores: BatchScores, request: InferRequest) -> Response:
    """The v2 response: JSON, or JSON header + raw little-endian tensor bytes when any output is binary."""
    arrays = output_arrays(engine, scores)
    wanted = request.outputs if request.outputs is not None else tuple(RequestedOutput(name, request.binary_outputs) for name in arrays)
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for output in wanted:
        datatype, values = arrays[output.name]
        tensor: dict[str, Any] = {"name": output.name, "datatype": datatype, "shape": [int(values.shape[0])]}
        if output.binary:
            raw = values.tobytes()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = values.tolist()
        tensors.append(tensor)
    content: dict[str, Any] = {"model_name": engine.name, "model_version": engine.version}
    if request.id is not None:
        content["id"] = request.id
    content["parameters"] = {"alpha": scores.alpha}
    content["outputs"] = tensors
    header = orjson.dumps(content)
    if not chunks:
        return Response(header, media_type="application/json")
    return Response(
        b"".join([header, *chunks]),
        media_type="application/octet-stream",
        headers={"Inference-Header-Content-Length": str(len(header))},
    )
