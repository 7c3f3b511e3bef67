"""Integrity: every way a bundle can be wrong is refused, naming the problem, by the same checks at start-up
(`oodserve serve` and the app's lifespan) and at reload (the old bundle keeps serving); nothing in service/
can unpickle."""

from __future__ import annotations

import ast
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from oodserve.bundle import BundleError, write_bundle
from oodserve.cli import app as cli_app
from oodserve.config import Settings
from oodserve.server.app import create_app

SERVICE_ROOT = Path(__file__).resolve().parents[3] / "service"


def _rewrite_manifest(bundle: Path, edit: Callable[[dict], None]) -> None:
    """Edit manifest fields and re-hash the files (so only the edited fact is wrong)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["files"]
    edit(manifest)
    write_bundle(bundle, manifest)


def missing_file(bundle: Path) -> None:
    (bundle / "flow.onnx").unlink()


def altered_file(bundle: Path) -> None:
    data = bytearray((bundle / "calibration.npz").read_bytes())
    data[-10] ^= 0x40
    (bundle / "calibration.npz").write_bytes(bytes(data))


def extra_file(bundle: Path) -> None:
    (bundle / "weights.pkl").write_bytes(b"\x80\x04K\x01.")


def unknown_schema_version(bundle: Path) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def output_names_differ(bundle: Path) -> None:
    _rewrite_manifest(bundle, lambda manifest: manifest["models"]["sngp"]["outputs"].append("embedding"))


def input_names_differ(bundle: Path) -> None:
    _rewrite_manifest(bundle, lambda manifest: manifest["models"]["background"].update(inputs=["image"]))


def input_type_differs(bundle: Path) -> None:
    model = onnx.load_from_string((bundle / "flow.onnx").read_bytes())
    model.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UINT8  # the graph casts it, so it is valid ONNX
    (bundle / "flow.onnx").write_bytes(model.SerializeToString())
    _rewrite_manifest(bundle, lambda manifest: None)


FAULTS = {
    "missing": (missing_file, "missing file 'flow.onnx'"),
    "altered": (altered_file, "altered file 'calibration.npz'"),
    "extra": (extra_file, "unexpected file 'weights.pkl'"),
    "schema_version": (unknown_schema_version, "unsupported schema_version 99"),
    "onnx_outputs": (output_names_differ, "model file 'sngp.onnx': output names are"),
    "onnx_inputs": (input_names_differ, "model file 'background.onnx': input names are ['x'], the manifest declares ['image']"),
    "onnx_input_type": (input_type_differs, "model file 'flow.onnx': input 'x' has type tensor(uint8)"),
}


@pytest.fixture(params=sorted(FAULTS))
def broken(request: pytest.FixtureRequest, bundle_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A copy of the standard bundle with one fault, and the text the refusal must contain."""
    damage, expected = FAULTS[request.param]
    copy = Path(shutil.copytree(bundle_dir, tmp_path / "broken"))
    damage(copy)
    return copy, expected


@pytest.fixture
def restored_logging() -> Iterator[None]:
    """`serve` reconfigures the root logger onto CliRunner's stream; put it back for the tests that follow."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


def test_serve_refuses_to_start(broken: tuple[Path, str], restored_logging: None) -> None:
    bundle, expected = broken
    result = CliRunner().invoke(cli_app, ["serve", "--bundle", str(bundle), "--port", "1"])
    assert result.exit_code == 2, result.output
    assert "refusing to start" in result.output and expected in result.output


def test_app_lifespan_refuses_to_start(broken: tuple[Path, str], settings_for: Callable[..., Settings]) -> None:
    bundle, expected = broken
    with pytest.raises(BundleError) as refused:
        with TestClient(create_app(settings_for(bundle))):
            pass
    assert expected in str(refused.value)


def test_reload_refuses_and_keeps_serving(
    broken: tuple[Path, str], bundle_dir: Path, settings_for: Callable[..., Settings]
) -> None:
    bundle, expected = broken
    with TestClient(create_app(settings_for(bundle_dir, admin_keys=["admin"]))) as client:
        response = client.post("/v1/admin/reload", json={"bundle": str(bundle)}, headers={"authorization": "Bearer admin"})
        assert response.status_code == 422
        error = response.json()["error"]
        assert error["code"] == "bundle_refused" and expected in error["message"]
        score = client.post("/v1/score", json={"instances": [np.zeros((28, 28), int).tolist()]})
        assert score.status_code == 200 and score.json()["model"] == "test-bundle"


# --- no unpickling on the serving path -------------------------------------------------------------

FORBIDDEN_MODULES = {"pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "torch"}
NUMPY_NAMES = {"np", "numpy"}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def unpickling_problems(source: str, where: str) -> list[str]:
    """Imports of pickle-capable modules, numpy loads without a literal allow_pickle=False, any
    allow_pickle=True, and pandas.read_pickle, found in Python source."""
    problems: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for module in modules:
                if module.split(".")[0] in FORBIDDEN_MODULES:
                    problems.append(f"{where}:{node.lineno}: imports {module}")
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            allow = {keyword.arg: keyword.value for keyword in node.keywords}.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                problems.append(f"{where}:{node.lineno}: {name}(allow_pickle=...) is not the literal False")
            root = name.split(".")[0]
            if root in NUMPY_NAMES and name.rsplit(".", 1)[-1] in {"load", "read_array"} and allow is None:
                problems.append(f"{where}:{node.lineno}: {name}() without allow_pickle=False")
            if name.endswith("read_pickle") or name.endswith("pickle.loads"):
                problems.append(f"{where}:{node.lineno}: {name}()")
    return problems


def test_the_checker_finds_unpickling() -> None:
    bad = (
        "import pickle\nfrom joblib import load\nimport numpy as np\n"
        "np.load(path)\nnp.load(path, allow_pickle=True)\nnumpy.lib.format.read_array(f)\nnp.load(p, allow_pickle=flag)\n"
    )
    assert len(unpickling_problems(bad, "bad.py")) == 6
    assert unpickling_problems("import numpy as np\nnp.load(path, allow_pickle=False)\n", "good.py") == []


def test_nothing_in_service_unpickles() -> None:
    files = sorted(SERVICE_ROOT.rglob("*.py"))
    assert len(files) > 20
    problems = [problem for path in files for problem in unpickling_problems(path.read_text(), str(path.relative_to(SERVICE_ROOT.parent)))]
    assert problems == []
