"""The one path every bundle builder takes from model outputs to a bundle's signal data: fit each signal
kind's parameters on reference (training-split) outputs, then calibrate on held-out in-distribution data.

Conformal protocol (design.md section 4): per-signal calibration scores come from one held-out split,
the fused statistics (`__fused__`) from a second, disjoint split, so the fused p-value stays valid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import subprocess

import numpy as np

from oodserve.bundle.writer import write_calibration
from oodserve.scoring.conformal import conformal_p_values, sort_calibration_scores
from oodserve.scoring.pipeline import FUSED_CALIBRATION_KEY, FusionRule, SignalDefinition, compute_signals, fused_calibration_scores
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
        runtime_params: dict[str, Any] = dict(fitted.params)
        if fitted.arrays:
            file_name = str(fitted.params[PARAMETERS_FILE_KEY])
            files[file_name] = fitted.arrays
            runtime_params["arrays"] = fitted.arrays
        definitions.append(SignalDefinition(plan.name, plan.kind, source, runtime_params))
        entries.append({"name": plan.name, "kind": plan.kind, "model": plan.model, "output": plan.output, "params": fitted.params})
    return FittedSignals(definitions, entries, files)


def definitions_from_entries(entries: Sequence[Mapping[str, Any]]) -> list[SignalDefinition]:
    """Runtime definitions of manifest signal entries whose params are complete (no parameters files)."""
    return [
        SignalDefinition(entry["name"], entry["kind"], SignalSource(entry["model"], entry["output"]), entry.get("params", {}))
        for entry in entries
    ]


def signal_calibration(definitions: Sequence[SignalDefinition], outputs: ModelOutputs, images: np.ndarray) -> dict[str, np.ndarray]:
    """Sorted calibration scores (n,) per signal from the first held-out split."""
    return {name: sort_calibration_scores(values) for name, values in compute_signals(definitions, outputs, images).items()}


def p_values_against(calibration: Mapping[str, np.ndarray], signals: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Conformal p-values (N,) of raw signal values against sorted calibration scores, per signal."""
    return {name: conformal_p_values(calibration[name], values) for name, values in signals.items()}


def calibration_arrays(
    definitions: Sequence[SignalDefinition],
    fusion: FusionRule,
    signal_split: tuple[ModelOutputs, np.ndarray],
    fusion_split: tuple[ModelOutputs, np.ndarray],
) -> dict[str, np.ndarray]:
    """Per-signal scores of the first split and `__fused__` statistics of the second; splits are
    (outputs, images (N, *input_shape))."""
    per_signal = signal_calibration(definitions, *signal_split)
    second = compute_signals(definitions, *fusion_split)
    return {**per_signal, FUSED_CALIBRATION_KEY: fused_calibration_scores(per_signal, second, fusion)}


def write_signal_data(directory: Path, calibration: Mapping[str, np.ndarray], parameter_files: Mapping[str, Mapping[str, np.ndarray]]) -> None:
    """calibration.npz and every signal's parameters file (.npz, no pickle) into the bundle directory."""
    write_calibration(directory / CALIBRATION_FILE, calibration)
    for file_name, arrays in parameter_files.items():
        with open(directory / file_name, "wb") as handle:
            np.savez(handle, **arrays)
