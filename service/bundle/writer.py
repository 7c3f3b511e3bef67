"""Writing bundles: sha256 of every file, the calibration .npz, and a validated manifest.json.

The torch-side bundle builder (and the demo builder) put the .onnx files in a directory, call
`write_calibration`, then `write_bundle` with every manifest field except `files`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from oodserve.bundle.manifest import MANIFEST_FILE_NAME, Manifest

_CHUNK_BYTES = 1 << 20


def sha256_bytes(data: bytes) -> str:
    """Lowercase hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path | str) -> str:
    """Lowercase hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_file_names(directory: Path) -> list[str]:
    """Every regular file below `directory` as a relative POSIX path, sorted, except manifest.json."""
    names = [path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file()]
    return sorted(name for name in names if name != MANIFEST_FILE_NAME)


def write_calibration(path: Path | str, arrays: Mapping[str, np.ndarray]) -> None:
    """Save calibration scores as an uncompressed .npz of 1-D float64 arrays (no pickled objects)."""
    converted: dict[str, Any] = {}
    for name, values in arrays.items():
        array = np.asarray(values, dtype=np.float64)
        if array.ndim != 1 or array.size == 0 or not np.all(np.isfinite(array)):
            raise ValueError(f"calibration array {name!r} must be a non-empty finite 1-D array, got shape {list(array.shape)}")
        converted[name] = array
    with open(path, "wb") as handle:
        np.savez(handle, **converted)


def write_bundle(directory: Path | str, manifest_fields: Mapping[str, Any]) -> Manifest:
    """Hash every file in `directory`, validate the manifest and write manifest.json.

    manifest_fields: every manifest key except `files` (a `files` key is refused: the hashes
    are always computed here). Returns the validated `Manifest`.
    """
    directory = Path(directory)
    if "files" in manifest_fields:
        raise ValueError("write_bundle computes `files` itself; leave it out of manifest_fields")
    files = {name: sha256_file(directory / name) for name in bundle_file_names(directory)}
    manifest = Manifest.model_validate({**manifest_fields, "files": files})
    text = json.dumps(manifest.model_dump(mode="json"), indent=2, sort_keys=False)
    (directory / MANIFEST_FILE_NAME).write_text(text + "\n", encoding="utf-8")
    return manifest
