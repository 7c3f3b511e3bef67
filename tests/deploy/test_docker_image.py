"""The CPU image built and run for real: deploy/docker/build-local.sh builds the Dockerfile's `cpu` target with podman
(on a stand-in python:3.11-slim-bookworm base made with debootstrap where no registry is reachable) and runs it as a
user would: the image's own CMD and user, a read-only root and a /tmp tmpfs. The container answers /readyz, passes
its HEALTHCHECK, scores a request with the shipped bundle, holds neither torch nor pip nor any other bundle, and runs as
uid and gid 10001; every package the build printed is at the version the lock pins. Container and image are removed
afterwards (the stand-in base too; its saved copy stays in the cache for the next run)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from oodserve.bench.http_driver import free_port
from tests.deploy.test_docker import DOCKERFILE, normalised, parse_dockerfile, pinned_versions
from tests.helpers.deploy_support import REPO, http_get, http_post_json, scoring_images, wait_until
from tests.helpers.redis_server import RedisServer, server_binary

BUILD_LOCAL = REPO / "deploy" / "docker" / "build-local.sh"
TOOLS = ("podman", "runc", "debootstrap")


@dataclass
class Image:
    tag: str
    build_log: str
    base_seconds: float
    build_seconds: float
    environment: dict[str, str]

    def podman(self, *arguments: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess[str]:
        """podman with the script's flags (runc, cgroupfs, file events)."""
        return subprocess.run(
            ["sh", str(BUILD_LOCAL), "podman", *arguments],
            env=self.environment,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=check,
        )


@pytest.fixture(scope="module")
def cpu_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Image]:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed: `make system-deps` installs them (apt: podman runc debootstrap)")
    workdir = tmp_path_factory.mktemp("image")
    # A tag of our own (never the user's oodserve:cpu), no intermediate images kept, temporary files under the test's dir.
    environment = {
        **os.environ,
        "IMAGE": f"localhost/oodserve-test:cpu-{os.getpid()}",
        "LAYERS": "false",
        "TMPDIR": str(workdir),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin",
    }
    started = time.monotonic()
    try:
        # The stand-in base: made with debootstrap (about a minute), or loaded from the cache, or already there.
        base = subprocess.run(["sh", str(BUILD_LOCAL), "base"], env=environment, capture_output=True, text=True, timeout=300)
        assert base.returncode == 0, base.stderr[-6000:]
        base_seconds = time.monotonic() - started
        build = subprocess.run(["sh", str(BUILD_LOCAL), "build", "cpu"], env=environment, capture_output=True, text=True, timeout=480)
        image = Image(
            environment["IMAGE"], build.stdout + build.stderr, base_seconds, time.monotonic() - started - base_seconds, environment
        )
        assert build.returncode == 0, image.build_log[-6000:]
        yield image
    finally:
        subprocess.run(["sh", str(BUILD_LOCAL), "remove"], env=environment, capture_output=True, timeout=120)


def printed_versions(build_log: str) -> dict[str, str]:
    """The `name==version` lines install-runtime.sh printed after installing into /opt/oodserve."""
    lines = build_log.split("install-runtime.sh: installed into /opt/oodserve:", 1)[1].splitlines()[1:]
    versions = {}
    for line in lines:
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==(\S+)", line.strip())
        if match is None:
            break
        versions[normalised(match.group(1))] = match.group(2)
    return versions


@pytest.mark.slow
@pytest.mark.timeout(900)  # a ceiling for a loaded machine: about 3 to 5 minutes from a bare machine, the base made anew
def test_cpu_image_builds_and_serves_read_only_as_10001_without_torch(cpu_image: Image, capsys: pytest.CaptureFixture[str]) -> None:
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    bundle = stages["cpu"].arguments("ARG")[0].split("=")[1]
    # The build printed what it installed, and that is exactly the lock: the same commit builds the same venv.
    versions = printed_versions(cpu_image.build_log)
    assert "onnxruntime" in versions and "torch" not in versions and "onnxruntime-gpu" not in versions
    pins = pinned_versions()
    assert {name: version for name, version in versions.items() if name != "oodserve"} == {
        name: pins.get(name) for name in versions if name != "oodserve"
    }
    configuration = json.loads(cpu_image.podman("image", "inspect", cpu_image.tag).stdout)[0]
    assert configuration["Config"]["User"] == "10001:10001"
    assert configuration["Config"]["Cmd"] == ["oodserve", "serve"]
    # Kept by --format docker (podman reports it beside Config, Docker inside it).
    health_check = configuration.get("Healthcheck") or configuration["Config"].get("Healthcheck")
    assert health_check["Test"][:2] == ["CMD", "python"], health_check
    size = int(configuration["Size"])

    port = free_port()
    name = f"oodserve-test-{os.getpid()}"
    started = time.monotonic()
    run = subprocess.run(
        ["sh", str(BUILD_LOCAL), "run", "--detach", "--name", name],
        env={**cpu_image.environment, "PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        assert run.returncode == 0, run.stderr
        wait_until(lambda: http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 120, "the container ready")
        ready_seconds = time.monotonic() - started
        # The image's own HEALTHCHECK command, run by podman inside the container.
        health = cpu_image.podman("healthcheck", "run", name, check=False)
        assert health.returncode == 0 and "unhealthy" not in health.stdout, health.stdout + health.stderr
        # The shipped bundle scores Fashion-MNIST test images and uniform noise; the noise is out of distribution.
        images = scoring_images()
        answer = http_post_json(f"http://127.0.0.1:{port}/v1/score", {"instances": images.tolist()})
        assert answer["model"] == bundle and len(answer["results"]) == len(images)
        assert all(result["is_ood"] for result in answer["results"][6:])
        inside = cpu_image.podman(
            "exec",
            name,
            "sh",
            "-c",
            "id -u; id -g; id -gn; ls /app/models/bundles; "
            "python -c 'import torch' 2>/dev/null && echo torch-present || echo torch-absent; "
            "python -m pip --version >/dev/null 2>&1 && echo pip-present || echo pip-absent; "
            "touch /app/written 2>/dev/null && echo root-writable || echo root-read-only; "
            "touch /tmp/written && echo tmp-writable; "
            'awk \'$1 == "CapEff:" || $1 == "NoNewPrivs:" {print $2}\' /proc/1/status',
        ).stdout.split()
        # uid and gid 10001 (a real group), the one bundle, no torch or pip, only /tmp writable, and as deploy/compose.yaml
        # runs it: the server holds no capabilities and cannot gain privileges.
        assert inside == [
            "10001", "10001", "oodserve", bundle, "torch-absent", "pip-absent", "root-read-only", "tmp-writable", "0000000000000000", "1"
        ]  # fmt: skip
        container = json.loads(cpu_image.podman("inspect", name).stdout)[0]
        assert container["HostConfig"]["ReadonlyRootfs"] is True
    finally:
        logs = cpu_image.podman("logs", name, check=False)
        cpu_image.podman("rm", "--force", "--time", "5", name, check=False)
    assert "Traceback" not in logs.stdout + logs.stderr, (logs.stdout + logs.stderr)[-3000:]
    with capsys.disabled():
        print(
            f"\ncpu image {cpu_image.tag}: {size / 1e6:.0f} MB, base ready in {cpu_image.base_seconds:.0f} s, built in "
            f"{cpu_image.build_seconds:.0f} s, ready "
            f"{ready_seconds:.1f} s after `podman run`; onnxruntime {versions['onnxruntime']}, {len(versions)} distributions"
        )


@pytest.mark.slow
def test_cpu_image_feeds_a_shared_drift_store(cpu_image: Image, tmp_path: Path) -> None:
    """OODSERVE_DRIFT_STORE: the image carries the Redis client, and its drift streams reach a real server. The container
    shares the host's network here (the server listens on loopback only) and serves on a free port of it."""
    if server_binary() is None:
        pytest.skip("no redis-server: `make system-deps` installs it")
    port = free_port()
    name = f"oodserve-test-drift-{os.getpid()}"
    with RedisServer(tmp_path / "redis", appendonly=False) as server:
        run = subprocess.run(
            ["sh", str(BUILD_LOCAL), "run", "--detach", "--name", name, "--network", "host", "--env", f"OODSERVE_PORT={port}",
             "--env", f"OODSERVE_DRIFT_STORE={server.url}"],
            env={**cpu_image.environment, "PORT": ""}, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        try:
            assert run.returncode == 0, run.stderr
            wait_until(lambda: http_get(f"http://127.0.0.1:{port}/readyz")[0] == 200, 120, "the container ready")
            answer = http_post_json(f"http://127.0.0.1:{port}/v1/score", {"instances": scoring_images().tolist()})
            assert len(answer["results"]) == 10
            wait_until(lambda: bool(server.client().keys("oodserve:drift*")), 30, "drift keys written to the shared store")
            status, body = http_get(f"http://127.0.0.1:{port}/v1/models/{answer['model']}/drift")
            assert status == 200, body
        finally:
            logs = cpu_image.podman("logs", name, check=False)
            cpu_image.podman("rm", "--force", "--time", "5", name, check=False)
    assert "Traceback" not in logs.stdout + logs.stderr, (logs.stdout + logs.stderr)[-3000:]
