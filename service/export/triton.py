"""Export a verified bundle's ONNX models as a Triton Inference Server model repository (config.pbtxt per model,
onnxruntime backend, dynamic batching), next to a copy of the bundle for the scoring side that stays in oodserve."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from oodserve.bundle.loader import load_bundle

ONNX_TO_TRITON_TYPES = {
    "tensor(bool)": "TYPE_BOOL",
    "tensor(uint8)": "TYPE_UINT8",
    "tensor(uint16)": "TYPE_UINT16",
    "tensor(uint32)": "TYPE_UINT32",
    "tensor(uint64)": "TYPE_UINT64",
    "tensor(int8)": "TYPE_INT8",
    "tensor(int16)": "TYPE_INT16",
    "tensor(int32)": "TYPE_INT32",
    "tensor(int64)": "TYPE_INT64",
    "tensor(float16)": "TYPE_FP16",
    "tensor(float)": "TYPE_FP32",
    "tensor(double)": "TYPE_FP64",
    "tensor(string)": "TYPE_STRING",
}
INSTANCE_KINDS = {"auto": "KIND_AUTO", "gpu": "KIND_GPU", "cpu": "KIND_CPU"}
REPOSITORY_DIRECTORY = "model_repository"
BUNDLE_DIRECTORY = "bundle"
MAPPING_FILE = "triton_models.json"


class TritonExportError(ValueError):
    """A model cannot be described to Triton as a batching model (for example a fixed first dimension)."""


@dataclass(frozen=True)
class TritonTensor:
    """One input or output as Triton sees it: per-instance dims (batch axis left out, -1 = variable).

    Tensors that are only the batch axis ((N,) in ONNX) get dims [1] and an empty reshape, Triton's way of saying
    "one scalar per instance".
    """

    name: str
    data_type: str
    dims: tuple[int, ...]
    reshape_to_scalar: bool = False


@dataclass(frozen=True)
class TritonModelConfig:
    """What config.pbtxt says about one ONNX model."""

    name: str
    inputs: tuple[TritonTensor, ...]
    outputs: tuple[TritonTensor, ...]
    max_batch_size: int
    max_queue_delay_microseconds: int
    instance_kind: str
    instance_count: int


def triton_tensor(name: str, onnx_type: str, shape: Sequence[Any], model: str) -> TritonTensor:
    """ONNX (name, type, shape with a dynamic first axis) -> TritonTensor; refuses a fixed or missing batch axis."""
    if onnx_type not in ONNX_TO_TRITON_TYPES:
        raise TritonExportError(f"model {model!r}: tensor {name!r} has type {onnx_type}, which Triton cannot carry")
    if not shape or isinstance(shape[0], int):
        raise TritonExportError(
            f"model {model!r}: tensor {name!r} has shape {list(shape)}; dynamic batching needs a variable first (batch) axis"
        )
    dims = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in shape[1:])
    if not dims:
        return TritonTensor(name, ONNX_TO_TRITON_TYPES[onnx_type], (1,), reshape_to_scalar=True)
    return TritonTensor(name, ONNX_TO_TRITON_TYPES[onnx_type], dims)


def _render_tensors(section: str, tensors: Sequence[TritonTensor]) -> list[str]:
    lines = [f"{section} ["]
    for index, tensor in enumerate(tensors):
        lines += [
            "  {",
            f'    name: "{tensor.name}"',
            f"    data_type: {tensor.data_type}",
            f"    dims: [ {', '.join(str(dim) for dim in tensor.dims)} ]",
        ]
        if tensor.reshape_to_scalar:
            lines.append("    reshape: { shape: [ ] }")
        lines.append("  }," if index < len(tensors) - 1 else "  }")
    lines.append("]")
    return lines


def render_config(config: TritonModelConfig) -> str:
    """config.pbtxt text (protobuf text format of Triton's ModelConfig) for the onnxruntime backend."""
    lines = [
        f'name: "{config.name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {config.max_batch_size}",
        *_render_tensors("input", config.inputs),
        *_render_tensors("output", config.outputs),
        "dynamic_batching {",
        f"  max_queue_delay_microseconds: {config.max_queue_delay_microseconds}",
        "}",
        "instance_group [",
        "  {",
        f"    count: {config.instance_count}",
        f"    kind: {config.instance_kind}",
        "  }",
        "]",
    ]
    return "\n".join(lines) + "\n"


def _session_io(model_bytes: bytes) -> tuple[list[Any], list[Any]]:
    """Inputs and outputs (name, type, shape) of an ONNX graph, read by onnxruntime on the CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(model_bytes, sess_options=options, providers=["CPUExecutionProvider"])
    return list(session.get_inputs()), list(session.get_outputs())


@dataclass(frozen=True)
class TritonExport:
    """What export_triton_repository wrote: the repository, the bundle copy and Triton name per bundle model."""

    repository: Path
    bundle: Path
    model_names: dict[str, str]


def export_triton_repository(
    bundle_directory: Path | str,
    out_directory: Path | str,
    max_batch_size: int = 256,
    max_queue_delay_microseconds: int = 2000,
    instance_kind: str = "auto",
    instance_count: int = 1,
    name_prefix: str | None = None,
) -> TritonExport:
    """Verify the bundle, then write under out_directory:

    - model_repository/<prefix><model>/config.pbtxt and 1/model.onnx for each ONNX model of the manifest
      (the verified bytes; `tritonserver --model-repository out/model_repository`);
    - bundle/: a copy of the whole verified bundle (manifest, calibration, ONNX files) for the scoring side;
    - triton_models.json: bundle model name -> Triton model name with its inputs and outputs.
    name_prefix defaults to "<bundle name>-" so several bundles can share one Triton fleet.
    """
    if max_batch_size < 1:
        raise TritonExportError(f"max_batch_size must be at least 1, got {max_batch_size}")
    if instance_kind not in INSTANCE_KINDS:
        raise TritonExportError(f"instance kind must be one of {sorted(INSTANCE_KINDS)}, got {instance_kind!r}")
    bundle = load_bundle(bundle_directory)
    manifest = bundle.manifest
    prefix = f"{manifest.name}-" if name_prefix is None else name_prefix
    out = Path(out_directory)
    repository, bundle_copy = out / REPOSITORY_DIRECTORY, out / BUNDLE_DIRECTORY
    for existing in (repository, bundle_copy):
        if existing.exists() and any(existing.iterdir()):
            raise TritonExportError(f"{existing} already exists and is not empty; choose an empty --out directory")
    configs: dict[str, TritonModelConfig] = {}
    for model_name in manifest.models:
        inputs, outputs = _session_io(bundle.model_bytes[model_name])
        configs[model_name] = TritonModelConfig(
            name=f"{prefix}{model_name}",
            inputs=tuple(triton_tensor(node.name, node.type, node.shape, model_name) for node in inputs),
            outputs=tuple(triton_tensor(node.name, node.type, node.shape, model_name) for node in outputs),
            max_batch_size=max_batch_size,
            max_queue_delay_microseconds=max_queue_delay_microseconds,
            instance_kind=INSTANCE_KINDS[instance_kind],
            instance_count=instance_count,
        )
    for model_name, config in configs.items():
        model_directory = repository / config.name
        (model_directory / "1").mkdir(parents=True, exist_ok=True)
        (model_directory / "1" / "model.onnx").write_bytes(bundle.model_bytes[model_name])
        (model_directory / "config.pbtxt").write_text(render_config(config))
    bundle_copy.mkdir(parents=True, exist_ok=True)
    source = Path(bundle_directory)
    for file_name in ["manifest.json", *manifest.files]:
        (bundle_copy / file_name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source / file_name, bundle_copy / file_name)
    load_bundle(bundle_copy)  # the copy verifies like the original
    mapping = {
        "bundle": {"name": manifest.name, "version": manifest.version, "directory": BUNDLE_DIRECTORY},
        "models": {
            model_name: {
                "triton_model": config.name,
                "inputs": [tensor.name for tensor in config.inputs],
                "outputs": [tensor.name for tensor in config.outputs],
            }
            for model_name, config in configs.items()
        },
    }
    (out / MAPPING_FILE).write_text(json.dumps(mapping, indent=2) + "\n")
    return TritonExport(repository, bundle_copy, {model_name: config.name for model_name, config in configs.items()})


__all__ = ["TritonExport", "TritonExportError", "export_triton_repository", "render_config", "triton_tensor"]
