"""Loading a bundle: parse the manifest, verify every sha256, refuse missing/altered/extra files, read calibration."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import ValidationError

from oodserve.bundle.calibration import (
    CONDITIONAL_KEY,
    FUSED_CALIBRATION_KEY,
    HELD_OUT_PREFIX,
    CalibrationScores,
    rank_calibration,
    sort_calibration_scores,
)
from oodserve.bundle.manifest import MANIFEST_FILE_NAME, SCHEMA_VERSION, Manifest
from oodserve.bundle.signals import PARAMETERS_FILE_KEY
from oodserve.bundle.writer import bundle_file_names, sha256_bytes


class BundleError(Exception):
    """The bundle cannot be served; the message names the bundle and the offending file or field."""


@dataclass(frozen=True)
class VerifiedBundle:
    """A bundle whose files all matched their sha256: manifest, verified ONNX bytes, sorted calibration."""

    directory: Path
    manifest: Manifest
    model_bytes: dict[str, bytes]
    calibration: CalibrationScores
    signal_arrays: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    sampler_bytes: bytes | None = None
    batch_reference_bpd: np.ndarray | None = None
    """signal name -> arrays of its verified `parameters_file` (.npz, loaded without pickle)."""


def parse_manifest(raw: Any, where: str) -> Manifest:
    """Validate manifest JSON; the schema_version is checked first so a newer bundle gets a clear message."""
    if not isinstance(raw, dict):
        raise BundleError(f"{where}: manifest must be a JSON object, got {type(raw).__name__}")
    version = raw.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(f"{where}: unsupported schema_version {version!r}; this service reads schema_version {SCHEMA_VERSION}")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in issue['loc']) or 'manifest'}: {issue['msg']}" for issue in error.errors()
        )
        raise BundleError(f"{where}: invalid manifest: {problems}") from error


def read_manifest(directory: Path | str) -> Manifest:
    """Read and validate `directory/manifest.json` (no file verification)."""
    path = Path(directory) / MANIFEST_FILE_NAME
    if not path.is_file():
        raise BundleError(f"bundle {Path(directory)}: {MANIFEST_FILE_NAME} not found")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise BundleError(f"{path}: not valid JSON: {error}") from error
    return parse_manifest(raw, str(path))


def verify_files(directory: Path, manifest: Manifest) -> dict[str, bytes]:
    """Read every listed file once and compare its sha256; refuse missing, altered and unlisted files.

    Returns file name -> verified bytes (what is hashed is exactly what gets loaded).
    """
    problems: list[str] = []
    verified: dict[str, bytes] = {}
    for file_name, expected in manifest.files.items():
        path = directory / file_name
        if not path.is_file():
            problems.append(f"missing file {file_name!r}")
            continue
        data = path.read_bytes()
        actual = sha256_bytes(data)
        if actual != expected:
            problems.append(f"altered file {file_name!r}: sha256 is {actual}, manifest says {expected}")
            continue
        verified[file_name] = data
    for file_name in bundle_file_names(directory):
        if file_name not in manifest.files:
            problems.append(f"unexpected file {file_name!r} not listed in the manifest")
    if problems:
        raise BundleError(f"bundle {directory} refused: " + "; ".join(problems))
    return verified


def calibration_array_names(manifest: Manifest) -> list[str]:
    """The arrays the calibration .npz of `manifest` holds (`CalibrationSpec` says which)."""
    spec = manifest.calibration
    signals = [signal.name for signal in manifest.signals]
    if spec.folds is not None:
        return signals + [HELD_OUT_PREFIX + name for name in signals] + spec.fold_names(FUSED_CALIBRATION_KEY)
    return signals + [FUSED_CALIBRATION_KEY] + ([CONDITIONAL_KEY] if spec.guarantee == "conditional" else [])


def load_calibration(data: bytes, file_name: str, manifest: Manifest) -> CalibrationScores:
    """Parse the calibration .npz (allow_pickle=False): one finite 1-D array per name of `calibration_array_names`."""
    expected = calibration_array_names(manifest)
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            present = set(archive.files)
            missing = [name for name in expected if name not in present]
            unexpected = sorted(present - set(expected))
            if missing or unexpected:
                raise BundleError(
                    f"calibration file {file_name!r}: missing arrays {missing}, unexpected arrays {unexpected}"
                )
            arrays = {name: archive[name] for name in expected}
    except BundleError:
        raise
    except Exception as error:  # noqa: BLE001 - any parse failure of an untrusted file is a refusal
        raise BundleError(f"calibration file {file_name!r} cannot be read without pickle: {error}") from error
    sorted_arrays: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        if array.dtype.kind not in "fiu":
            raise BundleError(f"calibration file {file_name!r}: array {name!r} has dtype {array.dtype}, expected float64")
        try:
            sorted_arrays[name] = array.astype(np.float64) if name == CONDITIONAL_KEY else sort_calibration_scores(array)
        except ValueError as error:
            raise BundleError(f"calibration file {file_name!r}: array {name!r}: {error}") from error
    spec = manifest.calibration
    if spec.folds is not None:
        by_fold = tuple(sorted_arrays.pop(name) for name in spec.fold_names(FUSED_CALIBRATION_KEY))
        held_out = {signal.name: sorted_arrays.pop(HELD_OUT_PREFIX + signal.name) for signal in manifest.signals}
        return CalibrationScores(per_signal=sorted_arrays, fused=rank_calibration(sum(len(fold) for fold in by_fold)),
                                 folds=spec.folds, held_out=held_out, fused_by_fold=by_fold)
    fused = sorted_arrays.pop(FUSED_CALIBRATION_KEY)
    conditional = sorted_arrays.pop(CONDITIONAL_KEY, None)
    if conditional is not None:
        ok = conditional.ndim == 1 and conditional.size == fused.size + 1 and np.all(np.isfinite(conditional))
        if not (ok and np.all(np.diff(conditional) >= 0) and conditional[0] > 0 and conditional[-1] <= 1.0):
            raise BundleError(f"calibration file {file_name!r}: {CONDITIONAL_KEY!r} must be {fused.size + 1} non-decreasing "
                              "p-values in (0, 1], one per count of fused calibration scores at or above a statistic")
    return CalibrationScores(per_signal=sorted_arrays, fused=fused, conditional=conditional)


def load_bundle(directory: Path | str) -> VerifiedBundle:
    """Validate the manifest, verify every file's sha256 and read the calibration arrays.

    Raises BundleError naming the file for a missing, altered or unlisted file, an invalid
    manifest or unreadable calibration. ONNX input/output names are checked when sessions
    are created (oodserve.runtime.sessions).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(f"bundle directory {directory} does not exist")
    manifest = read_manifest(directory)
    verified = verify_files(directory, manifest)
    calibration = load_calibration(verified[manifest.calibration.file], manifest.calibration.file, manifest)
    model_bytes = {name: verified[spec.file] for name, spec in manifest.models.items()}
    signal_arrays = {
        signal.name: load_parameter_arrays(verified[signal.params[PARAMETERS_FILE_KEY]], signal.params[PARAMETERS_FILE_KEY])
        for signal in manifest.signals
        if PARAMETERS_FILE_KEY in signal.params
    }
    batch_reference_bpd = None
    if manifest.batch_typicality is not None:
        file_name = manifest.batch_typicality.parameters_file
        arrays = load_parameter_arrays(verified[file_name], file_name)
        if "reference_bpd" not in arrays or arrays["reference_bpd"].ndim != 1 or arrays["reference_bpd"].size < 2:
            raise BundleError(f"parameters file {file_name!r} must hold a 1-D array 'reference_bpd' of >= 2 values")
        batch_reference_bpd = arrays["reference_bpd"].astype(np.float64)
    return VerifiedBundle(
        directory=directory, manifest=manifest, model_bytes=model_bytes, calibration=calibration,
        signal_arrays=signal_arrays,
        sampler_bytes=verified[manifest.sampler.file] if manifest.sampler is not None else None,
        batch_reference_bpd=batch_reference_bpd,
    )


def load_parameter_arrays(data: bytes, file_name: str) -> dict[str, np.ndarray]:
    """Numeric arrays of a signal's parameters .npz (allow_pickle=False); refuses anything else."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except Exception as error:  # noqa: BLE001 - any parse failure of an untrusted file is a refusal
        raise BundleError(f"parameters file {file_name!r} cannot be read without pickle: {error}") from error
    for name, array in arrays.items():
        if array.dtype.kind not in "fiu" or not np.all(np.isfinite(array)):
            raise BundleError(f"parameters file {file_name!r}: array {name!r} must be finite numbers, got dtype {array.dtype}")
    return arrays
