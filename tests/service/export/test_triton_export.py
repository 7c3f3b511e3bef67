"""`oodserve export-triton` on the shipped demo bundle: one Triton model per ONNX model whose config.pbtxt parses as
Triton's ModelConfig and whose names, types and dims match the ONNX graph (read with the onnx package), dynamic
batching on, the verified bytes as 1/model.onnx, and a verifiable bundle copy for the scoring side."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType

import onnx
import pytest
from typer.testing import CliRunner

from oodserve.bundle.loader import load_bundle
from oodserve.cli import app
from oodserve.export.triton import TritonExportError, TritonModelConfig, render_config, triton_tensor

DEMO_BUNDLE = Path(__file__).resolve().parents[3] / "models" / "bundles" / "demo"
ONNX_ELEMENT_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.DOUBLE: "TYPE_FP64", onnx.TensorProto.INT64: "TYPE_INT64"}


def triton_model_config_module() -> ModuleType:
    """Triton's ModelConfig protobuf, loaded from tritonclient's generated module without its grpc package."""
    tritonclient = pytest.importorskip("tritonclient")
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    if not path.exists():
        pytest.skip("tritonclient without model_config_pb2")
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def graph_tensors(values: list[onnx.ValueInfoProto]) -> list[tuple[str, str, list[int | str]]]:
    """(name, Triton type, shape with dim_param names as strings) straight from the ONNX graph."""
    found = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape = [
            dim.dim_param if dim.HasField("dim_param") or not dim.HasField("dim_value") else dim.dim_value for dim in tensor_type.shape.dim
        ]
        found.append((value.name, ONNX_ELEMENT_TYPES[tensor_type.elem_type], shape))
    return found


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("triton")
    result = CliRunner().invoke(app, ["export-triton", "--bundle", str(DEMO_BUNDLE), "--out", str(out), "--max-batch-size", "128"])
    assert result.exit_code == 0, result.output
    return out, result.output


def test_every_onnx_model_becomes_a_triton_model_matching_its_graph(exported: tuple[Path, str]) -> None:
    from google.protobuf import text_format

    out, output = exported
    model_config = triton_model_config_module()
    manifest = json.loads((DEMO_BUNDLE / "manifest.json").read_text())
    repository = out / "model_repository"
    assert sorted(path.name for path in repository.iterdir()) == sorted(f"{manifest['name']}-{name}" for name in manifest["models"])
    for name, spec in manifest["models"].items():
        directory = repository / f"{manifest['name']}-{name}"
        model_bytes = (directory / "1" / "model.onnx").read_bytes()
        assert hashlib.sha256(model_bytes).hexdigest() == manifest["files"][spec["file"]]
        text = (directory / "config.pbtxt").read_text()
        config = text_format.Parse(text, model_config.ModelConfig())  # unknown fields or enum values would raise
        assert config.name == directory.name and config.platform == "onnxruntime_onnx"
        assert config.max_batch_size == 128
        assert config.HasField("dynamic_batching") and config.dynamic_batching.max_queue_delay_microseconds == 2000
        assert [group.kind for group in config.instance_group] == [model_config.ModelInstanceGroup.KIND_AUTO]
        graph = onnx.load_from_string(model_bytes).graph
        for declared, tensors in ((config.input, graph_tensors(graph.input)), (config.output, graph_tensors(graph.output))):
            assert [tensor.name for tensor in declared] == [tensor_name for tensor_name, _, _ in tensors]
            for tensor, (_, triton_type, shape) in zip(declared, tensors):
                assert model_config.DataType.Name(tensor.data_type) == triton_type
                assert isinstance(shape[0], str)  # the batch axis is dynamic in the graph
                per_instance = [dim if isinstance(dim, int) else -1 for dim in shape[1:]]
                if per_instance:
                    assert list(tensor.dims) == per_instance and not tensor.HasField("reshape")
                else:
                    assert list(tensor.dims) == [1] and tensor.HasField("reshape") and list(tensor.reshape.shape) == []
        # The text itself, as Triton operators read it.
        assert re.search(r'^platform: "onnxruntime_onnx"$', text, re.M)
        assert 'name: "x"' in text and "dims: [ 1, 28, 28 ]" in text
        assert f"{name} -> {directory}" in output


def test_the_bundle_copy_verifies_and_the_mapping_names_the_triton_models(exported: tuple[Path, str]) -> None:
    out, _ = exported
    copy = load_bundle(out / "bundle")
    assert copy.manifest.name == json.loads((DEMO_BUNDLE / "manifest.json").read_text())["name"]
    mapping = json.loads((out / "triton_models.json").read_text())
    assert mapping["bundle"]["directory"] == "bundle"
    for name, spec in copy.manifest.models.items():
        entry = mapping["models"][name]
        assert (out / "model_repository" / entry["triton_model"] / "config.pbtxt").exists()
        assert entry["inputs"] == spec.inputs and sorted(entry["outputs"]) == sorted(spec.outputs)


def test_export_refuses_a_non_empty_output_and_a_fixed_batch_axis(exported: tuple[Path, str], tmp_path: Path) -> None:
    out, _ = exported
    again = CliRunner().invoke(app, ["export-triton", "--bundle", str(DEMO_BUNDLE), "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output
    with pytest.raises(TritonExportError, match="variable first"):
        triton_tensor("x", "tensor(float)", [8, 1, 28, 28], "fixed")
    with pytest.raises(TritonExportError, match="cannot carry"):
        triton_tensor("x", "seq(tensor(float))", ["N"], "odd")
    missing = CliRunner().invoke(app, ["export-triton", "--bundle", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2


def test_render_config_marks_per_instance_scalars_and_variable_dims() -> None:
    config = TritonModelConfig(
        name="m",
        inputs=(triton_tensor("x", "tensor(float)", ["N", 3, "H", "W"], "m"),),
        outputs=(triton_tensor("score", "tensor(double)", ["N"], "m"),),
        max_batch_size=4,
        max_queue_delay_microseconds=100,
        instance_kind="KIND_GPU",
        instance_count=2,
    )
    text = render_config(config)
    assert "dims: [ 3, -1, -1 ]" in text
    assert "data_type: TYPE_FP64\n    dims: [ 1 ]\n    reshape: { shape: [ ] }" in text
    assert "count: 2\n    kind: KIND_GPU" in text
