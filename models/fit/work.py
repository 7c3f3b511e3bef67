"""A resumable work directory: each finished stage leaves its result and a `.done` marker, and a fit that
is run again with the same data and settings picks the finished stages up instead of redoing them."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

FINGERPRINT_FILE = "fingerprint.json"


def data_fingerprint(*arrays: np.ndarray | None, **settings: Any) -> str:
    """sha256 over the arrays' bytes and shapes and the settings that change what a stage produces."""
    digest = hashlib.sha256()
    for array in arrays:
        if array is not None:
            contiguous = np.ascontiguousarray(array)
            digest.update(str((contiguous.shape, contiguous.dtype.str)).encode())
            digest.update(contiguous.tobytes())
    digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return digest.hexdigest()


class WorkDirectory:
    """Stage results under `path`; a different fingerprint (other data or settings) starts it afresh."""

    def __init__(self, path: Path, fingerprint: str) -> None:
        self.path = Path(path)
        marker = self.path / FINGERPRINT_FILE
        if marker.exists() and json.loads(marker.read_text()).get("fingerprint") != fingerprint:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"fingerprint": fingerprint}) + "\n")

    def done(self, stage: str) -> bool:
        return (self.path / f"{stage}.done").exists()

    def finish(self, stage: str, info: dict[str, Any]) -> None:
        (self.path / f"{stage}.done").write_text(json.dumps(info, indent=2, default=float) + "\n")

    def info(self, stage: str) -> dict[str, Any]:
        result: dict[str, Any] = json.loads((self.path / f"{stage}.done").read_text())
        return result

    def file(self, name: str) -> Path:
        return self.path / name
