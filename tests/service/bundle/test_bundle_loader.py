"""Bundle loading: sha256 of every file verified; missing, altered, extra files and bad models refused by name."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from oodserve.bundle import BundleError, load_bundle, sha256_file, write_bundle
from oodserve.engine import Engine
from oodserve.runtime.providers import GpuRequiredError, resolve_providers
from oodserve.runtime.sessions import RuntimeOptions


@pytest.fixture
def bundle_copy(bundle_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle_dir, tmp_path / "bundle"))


def refusal(directory: Path) -> str:
    with pytest.raises(BundleError) as caught:
        Engine.load(directory, RuntimeOptions(intra_op_threads=1, inter_op_threads=1))
    return str(caught.value)


def test_write_bundle_lists_every_file_with_its_sha256(bundle_dir: Path) -> None:
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    assert set(manifest["files"]) == {"flow.onnx", "background.onnx", "sngp.onnx", "calibration.npz"}
    for name, digest in manifest["files"].items():
        assert digest == hashlib.sha256((bundle_dir / name).read_bytes()).hexdigest() == sha256_file(bundle_dir / name)


def test_verified_bundle_has_sorted_calibration(bundle_dir: Path) -> None:
    bundle = load_bundle(bundle_dir)
    for values in [*bundle.calibration.per_signal.values(), bundle.calibration.fused]:
        assert values.dtype == np.float64 and np.all(np.diff(values) >= 0)
    assert set(bundle.model_bytes) == {"flow", "background", "sngp"}


def test_tampered_file_is_refused_naming_it(bundle_copy: Path) -> None:
    data = bytearray((bundle_copy / "sngp.onnx").read_bytes())
    data[-1] ^= 0x01
    (bundle_copy / "sngp.onnx").write_bytes(bytes(data))
    message = refusal(bundle_copy)
    assert "altered file 'sngp.onnx'" in message and "flow.onnx" not in message


def test_tampered_calibration_is_refused_naming_it(bundle_copy: Path) -> None:
    with np.load(bundle_copy / "calibration.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    arrays["typicality"] = arrays["typicality"] * 0.5
    np.savez(bundle_copy / "calibration.npz", **arrays)
    assert "altered file 'calibration.npz'" in refusal(bundle_copy)


def test_missing_file_is_refused_naming_it(bundle_copy: Path) -> None:
    (bundle_copy / "flow.onnx").unlink()
    assert "missing file 'flow.onnx'" in refusal(bundle_copy)


def test_extra_file_is_refused_naming_it(bundle_copy: Path) -> None:
    (bundle_copy / "notes").mkdir()
    (bundle_copy / "notes" / "extra.txt").write_text("surprise")
    assert "unexpected file 'notes/extra.txt'" in refusal(bundle_copy)


def test_missing_manifest_and_directory_are_refused(bundle_copy: Path, tmp_path: Path) -> None:
    assert "does not exist" in refusal(tmp_path / "nowhere")
    (bundle_copy / "manifest.json").unlink()
    assert "manifest.json not found" in refusal(bundle_copy)


def test_manifest_output_names_must_match_the_onnx_model(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    manifest["models"]["sngp"]["outputs"] = ["logits", "variance", "embedding"]
    del manifest["files"]
    write_bundle(bundle_copy, manifest)
    message = refusal(bundle_copy)
    assert "model file 'sngp.onnx'" in message and "embedding" in message


def test_calibration_must_cover_every_signal_and_refuse_pickles(bundle_copy: Path) -> None:
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    del manifest["files"]
    with np.load(bundle_copy / "calibration.npz") as archive:
        arrays = {name: archive[name] for name in archive.files}
    del arrays["max_softmax"]
    np.savez(bundle_copy / "calibration.npz", **arrays)
    write_bundle(bundle_copy, manifest)
    assert "missing arrays ['max_softmax']" in refusal(bundle_copy)
    arrays["max_softmax"] = np.array([{"pickled": True}], dtype=object)
    np.savez(bundle_copy / "calibration.npz", **arrays)
    write_bundle(bundle_copy, manifest)
    assert "cannot be read without pickle" in refusal(bundle_copy)


def test_provider_resolution() -> None:
    cpu_only = ["AzureExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, cpu_only, require_gpu=False) == ["CPUExecutionProvider"]
    both = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert resolve_providers(None, both, require_gpu=False) == both
    assert resolve_providers(["CUDAExecutionProvider"], cpu_only, require_gpu=False) == ["CPUExecutionProvider"]
    assert resolve_providers(["CUDAExecutionProvider"], both, require_gpu=True) == ["CUDAExecutionProvider"]
    with pytest.raises(GpuRequiredError, match="OODSERVE_REQUIRE_GPU"):
        resolve_providers(None, cpu_only, require_gpu=True)


def test_require_gpu_refuses_to_load_without_cuda(bundle_dir: Path) -> None:
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("CUDA is available here")
    with pytest.raises(GpuRequiredError):
        Engine.load(bundle_dir, RuntimeOptions(require_gpu=True))
