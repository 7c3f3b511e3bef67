"""Fitting a bundle's signals: each planned signal kind's `fit` on reference (training-split) model outputs, giving the
runtime definitions, the manifest entries and the parameters files; the p-values and files the calibration
(`oodserve.models.build.calibrate`) computes and writes from them."""

from __future__ import annotations

import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from oodserve.bundle.writer import write_calibration
from oodserve.scoring.conformal import conformal_p_values
from oodserve.scoring.pipeline import SignalDefinition
from oodserve.scoring.signals import PARAMETERS_FILE_KEY, SIGNAL_KINDS, ModelOutputs, SignalSource

CALIBRATION_FILE = "calibration.npz"


def code_version() -> str:
    """The checkout's short git commit for a bundle's provenance, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


@dataclass(frozen=True)
class SignalPlan:
    """A signal a builder wants: its name, registered kind, the model output it reads, and the options
    handed to the kind's `fit` (for example `two_sided`, or the background model of a likelihood ratio)."""

    name: str
    kind: str
    model: str
    output: str
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FittedSignals:
    """Fitted signals: runtime definitions (arrays in memory), manifest entries (JSON), parameter files."""

    definitions: list[SignalDefinition]
    manifest_entries: list[dict[str, Any]]
    parameter_files: dict[str, dict[str, np.ndarray]]


def fit_signals(
    plans: Sequence[SignalPlan], reference_outputs: ModelOutputs, reference_images: np.ndarray, labels: np.ndarray | None = None
) -> FittedSignals:
    """Run every planned kind's `fit` on reference outputs (leading axis N) and images (N, *input_shape)."""
    definitions, entries, files = [], [], {}
    for plan in plans:
        source = SignalSource(plan.model, plan.output)
        fitted = SIGNAL_KINDS[plan.kind].fit(reference_outputs, reference_images, source, plan.options, labels)
        arrays = as_loaded(fitted.arrays)
        if arrays:
            files[str(fitted.params[PARAMETERS_FILE_KEY])] = arrays
        definitions.append(SignalDefinition(plan.name, plan.kind, source, dict(fitted.params), arrays))
        entries.append({"name": plan.name, "kind": plan.kind, "model": plan.model, "output": plan.output, "params": fitted.params})
    return FittedSignals(definitions, entries, files)


def as_loaded(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Parameter arrays laid out as the bundle loader hands them to the engine (C-contiguous): numpy's kernels (einsum,
    matmul) may round differently for another memory layout, and calibration scores must be computed exactly as the
    served ones (a transposed Cholesky factor moved class-conditional densities by one unit in the last place)."""
    return {name: np.ascontiguousarray(array) for name, array in arrays.items()}


def fitted_from_entries(entries: Sequence[Mapping[str, Any]], parameter_files: Mapping[str, Mapping[str, np.ndarray]]) -> FittedSignals:
    """Signals fitted elsewhere, given as manifest entries (name, kind, model, output, params) and the parameters files
    their `parameters_file` params name (file name -> arrays)."""
    definitions = []
    for entry in entries:
        params = dict(entry.get("params", {}))
        arrays = as_loaded(parameter_files.get(params.get(PARAMETERS_FILE_KEY, ""), {}))
        definitions.append(SignalDefinition(entry["name"], entry["kind"], SignalSource(entry["model"], entry["output"]), params, arrays))
    return FittedSignals(definitions, [dict(entry) for entry in entries], {name: dict(arrays) for name, arrays in parameter_files.items()})


def p_values_against(calibration: Mapping[str, np.ndarray], signals: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Conformal p-values (N,) of raw signal values against sorted calibration scores, per signal."""
    return {name: conformal_p_values(calibration[name], values) for name, values in signals.items()}


def write_signal_data(
    directory: Path, calibration: Mapping[str, np.ndarray], parameter_files: Mapping[str, Mapping[str, np.ndarray]]
) -> None:
    """calibration.npz and every signal's parameters file (.npz, no pickle) into the bundle directory."""
    write_calibration(directory / CALIBRATION_FILE, calibration)
    for file_name, arrays in parameter_files.items():
        with open(directory / file_name, "wb") as handle:
            stored: dict[str, Any] = dict(arrays)
            np.savez(handle, **stored)
