"""Start MLServer (from its own venv) on free 127.0.0.1 ports with this folder's runtime and settings, serving
one oodserve bundle's ONNX files; used by oodserve.bench.peers.compare from oodserve's venv.

The checked-in settings.json and model-settings.json are the configuration; a run copies them into a
temporary model repository and changes only what one run needs: the ports (free loopback ones), the
number of parallel workers, the bundle path (absolute) and the folders MLServer writes to (metrics, envs),
so nothing lands in the checkout. MLServer's working directory is that temporary folder.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from oodserve.bench.http_driver import free_port, wait_until_ok

HERE = Path(__file__).resolve().parent
DEFAULT_VENV = HERE / ".venv"


def mlserver_versions(venv: Path) -> dict[str, str]:
    """Versions of MLServer and the packages that decide its speed, as installed in `venv`."""
    script = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({n: m.version(n) for n in ('mlserver', 'uvicorn', 'uvloop', 'httptools', 'onnxruntime', 'numpy', 'fastapi')}))"
    )
    output = subprocess.run([str(venv / "bin" / "python"), "-c", script], check=True, capture_output=True, text=True, timeout=60)
    return json.loads(output.stdout)


class MLServerProcess:
    """`mlserver start` of a temporary repository holding this folder's settings and model settings for `bundle`
    with `workers` parallel workers (0: inference in the server process); stopped, whole process group, on exit."""

    def __init__(self, venv: Path, bundle: Path, workers: int, log: Path | None = None) -> None:
        executable = venv / "bin" / "mlserver"
        if not executable.exists():
            raise FileNotFoundError(f"no MLServer at {executable}; run service/bench/peers/mlserver/install.sh first")
        self.workers = workers
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        manifest = json.loads((bundle / "manifest.json").read_text())
        self.model = str(manifest["name"])
        self.directory = Path(tempfile.mkdtemp(prefix="oodserve-peer-mlserver-"))
        self.settings = self._write_repository(bundle.resolve(), workers)
        self._log = log.open("a") if log is not None else None
        output = self._log if self._log is not None else subprocess.DEVNULL
        environment = {**os.environ, "PYTHONPATH": str(HERE)}  # the runtime module is `runtime` from this folder
        environment.pop("VIRTUAL_ENV", None)
        self.process = subprocess.Popen(
            [str(executable), "start", str(self.directory)],
            cwd=self.directory,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the workers are stopped with it
        )

    def _write_repository(self, bundle: Path, workers: int) -> dict[str, Any]:
        settings: dict[str, Any] = json.loads((HERE / "settings.json").read_text())
        settings.update(
            host="127.0.0.1",
            http_port=self.port,
            grpc_port=free_port(),
            metrics_port=free_port(),
            parallel_workers=workers,
            metrics_dir=str(self.directory / ".metrics"),
            environments_dir=str(self.directory / ".envs"),
        )
        model_settings: dict[str, Any] = json.loads((HERE / "model-settings.json").read_text())
        model_settings["name"] = self.model
        model_settings.setdefault("parameters", {})["uri"] = str(bundle)
        (self.directory / "settings.json").write_text(json.dumps(settings, indent=2))
        model_folder = self.directory / self.model
        model_folder.mkdir()
        (model_folder / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
        return {"settings.json": settings, "model-settings.json": model_settings}

    def wait_ready(self, timeout: float = 180.0) -> None:
        """Until the model answers ready (MLServer loads it in every worker first)."""
        wait_until_ok(self.process, f"{self.url}/v2/models/{self.model}/ready", timeout, "MLServer (see its log)")

    def __enter__(self) -> MLServerProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # MLServer stops its workers on SIGTERM
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # workers left behind by an unclean exit, if any
        except ProcessLookupError:
            pass
        if self._log is not None:
            self._log.close()
        shutil.rmtree(self.directory, ignore_errors=True)
