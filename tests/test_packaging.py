"""One import name: the built wheel adds `oodserve` and nothing else to an environment, ships neither the
benchmarks nor the tests nor the shipped bundles' data, and lives beside a user's own `models` package."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def declared_packages() -> list[str]:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_package_in_the_tree_is_declared() -> None:
    """pyproject lists packages explicitly (package-dir maps service/ and models/): a package left out would be
    missing from the wheel without any other error."""
    roots = {"oodserve": REPO / "service", "oodserve.models": REPO / "models"}
    found = set()
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            relative = init.parent.relative_to(root).parts
            if "__pycache__" not in relative:
                found.add(".".join((name, *relative)))
    assert found == set(declared_packages())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built from a copy of what the wheel is made of (a checkout's build/ may hold stale files from earlier builds)."""
    out, source = tmp_path_factory.mktemp("wheel"), tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, source / name)
    for name in ("service", "models"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pt"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (built,) = out.glob("oodserve-*.whl")
    return built


@pytest.mark.slow
def test_the_wheel_adds_one_top_level_name(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names if ".dist-info/" not in name}
    assert top_level == {"oodserve"}
    assert not [name for name in names if name.startswith(("benchmarks/", "tests/", "oodserve/models/bundles/"))]
    assert "oodserve/server/app.py" in names and "oodserve/models/flows/glow.py" in names and "oodserve/py.typed" in names
    assert "oodserve/console/static/index.html" in names and "oodserve/server/v2_grpc/inference.binpb" in names
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "oodserve = oodserve.cli:app" in zipfile.ZipFile(wheel).read(entry_points).decode()


@pytest.mark.slow
def test_a_project_with_its_own_models_package_imports_both(wheel: Path, tmp_path: Path) -> None:
    """A fresh venv with only the wheel (its dependencies come from this environment's site-packages, read as a
    plain path, so this checkout's editable install is not in play), run from a project that has `models/`."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with zipfile.ZipFile(wheel) as archive:  # what `pip install --no-deps` puts in place, without pip in the venv
        archive.extractall(site)
    project = tmp_path / "project"
    (project / "models").mkdir(parents=True)
    (project / "models" / "__init__.py").write_text("OWNER = 'the user'\n")
    check = (
        "import models, oodserve, oodserve.server.app, oodserve.models.data, oodserve.datasets\n"
        "assert models.OWNER == 'the user', models.__file__\n"
        f"assert oodserve.__file__.startswith({site!r}), oodserve.__file__\n"
        "from oodserve.bundle.signals import signal_kinds\n"
        "assert {'bits_per_dim', 'typicality', 'max_softmax'} <= set(signal_kinds())  # the kinds' entry point\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('service') is None and importlib.util.find_spec('benchmarks') is None\n"
        "print('ok')\n"
    )
    dependencies = sysconfig.get_paths()["purelib"]
    result = subprocess.run([str(python), "-c", check], cwd=project, capture_output=True, text=True, timeout=300,
                            env={"PYTHONPATH": f"{project}:{dependencies}", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
