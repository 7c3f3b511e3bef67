"""The one calibrate-and-write path every bundle builder takes (images, vectors, the closed-form demo, a backbone's
features): from fitted signals and held-out data to a verified bundle directory.

1. per-signal calibration scores on the first held-out split (`CalibrationSets.signal`);
2. the fusion rule: given, or chosen label-free on self-made perturbations of the validation data
   (`FusionSearch`, `oodserve.models.build.fusion_choice`);
3. the fused statistics of the second, disjoint held-out split (`CalibrationSets.fusion`): `__fused__`;
4. calibration.npz, the signals' parameters files and manifest.json, built through the pydantic `Manifest`
   from the builder's typed `BundleDescription`.

Conformal protocol (design.md section 4): per-signal calibration scores come from one held-out split, the fused
statistics from a second, disjoint one, so the fused p-value stays valid (Vovk et al. 2005; Bates et al. 2023).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from oodserve.bundle.calibration import CONDITIONAL_KEY
from oodserve.bundle.manifest import (
    SCHEMA_VERSION,
    BatchTypicalitySpec,
    CalibrationSpec,
    ClassifierSpec,
    FusionSpec,
    InputSpec,
    Manifest,
    ModelSpec,
    Provenance,
    SamplerSpec,
    SignalSpec,
)
from oodserve.bundle.writer import write_bundle
from oodserve.models.build.conditional import conditional_band, conditional_statement
from oodserve.models.build.fusion_choice import FusionCandidate, choice_reason, choose_fusion
from oodserve.models.build.signals import CALIBRATION_FILE, FittedSignals, p_values_against, write_signal_data
from oodserve.scoring.conformal import sort_calibration_scores
from oodserve.scoring.pipeline import FUSED_CALIBRATION_KEY, FusionRule, compute_signals, fused_calibration_scores
from oodserve.scoring.signals import ModelOutputs


class BundleModels(Protocol):
    """The bundle's models as the calibration runs them."""

    def outputs(self, inputs: np.ndarray, what: str) -> ModelOutputs:
        """outputs[model][output] (leading axis N) for raw inputs (N, *input_shape); `what` names the set (progress)."""
        ...

    def signal_inputs(self, inputs: np.ndarray) -> np.ndarray:
        """The raw inputs (N, *input_shape) as the signal kinds read them (for example images as float64)."""
        ...


@dataclass(frozen=True)
class CalibrationSets:
    """Raw held-out inputs (N, *input_shape), never trained on: `signal` calibrates each signal, `fusion` the fused statistic."""

    signal: np.ndarray
    fusion: np.ndarray


@dataclass(frozen=True)
class FusionSearch:
    """Choose the fusion rule label-free: signals' p-values on `validation` (N, *input_shape) against those on
    `perturb(validation)` (set name -> perturbed copies). `what` names the validation rows in the reason;
    `never_fused` signals are reported only, and `reason_suffix` says why."""

    validation: np.ndarray
    perturb: Callable[[np.ndarray], Mapping[str, np.ndarray]]
    what: str
    never_fused: tuple[str, ...] = ()
    reason_suffix: str = ""


@dataclass(frozen=True)
class Calibrated:
    """The calibration result: sorted per-signal scores (n,), the fused statistics (m,), the fusion rule, the ranked
    candidates of a fusion search (empty for a given rule) and the raw signal values (m,) of the fusion split."""

    per_signal: dict[str, np.ndarray]
    fused: np.ndarray
    fusion: FusionSpec
    ranked: list[FusionCandidate]
    fusion_set_signals: dict[str, np.ndarray]

    def top_candidates(self, count: int = 5) -> list[dict[str, Any]]:
        """The best `count` candidates of the fusion search for the provenance (rounded to 4 digits)."""
        return [
            {
                "method": candidate.method,
                "signals": list(candidate.signals),
                "objective": round(candidate.objective, 4),
                "auroc_by_set": {name: round(value, 4) for name, value in candidate.auroc_by_set.items()},
            }
            for candidate in self.ranked[:count]
        ]


@dataclass(frozen=True)
class BundleDescription:
    """Everything manifest.json says besides what the calibration produces (signals, calibration file, fusion) and the
    file hashes; `extra_files` (file name -> arrays) are written as .npz beside the signals' parameters files."""

    name: str
    version: str
    description: str
    input: InputSpec
    models: dict[str, ModelSpec]
    default_alpha: float
    provenance: Provenance
    labels: list[str] | None = None
    classifier: ClassifierSpec | None = None
    sampler: SamplerSpec | None = None
    batch_typicality: BatchTypicalitySpec | None = None
    extra_files: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def calibrate(models: BundleModels, fitted: FittedSignals, sets: CalibrationSets, fusion: FusionSpec | FusionSearch) -> Calibrated:
    """Steps 1 to 3: per-signal scores, the fusion rule, the fused statistics."""
    definitions = fitted.definitions

    def signals_of(inputs: np.ndarray, what: str) -> dict[str, np.ndarray]:
        return compute_signals(definitions, models.outputs(inputs, what), models.signal_inputs(inputs))

    per_signal = {name: sort_calibration_scores(values) for name, values in signals_of(sets.signal, "signal calibration").items()}
    ranked: list[FusionCandidate] = []
    if isinstance(fusion, FusionSearch):
        validation_p = p_values_against(per_signal, signals_of(fusion.validation, "validation"))
        perturbed_p = {
            kind: p_values_against(per_signal, signals_of(batch, f"perturbation {kind}"))
            for kind, batch in fusion.perturb(fusion.validation).items()
        }
        candidates = [definition.name for definition in definitions if definition.name not in fusion.never_fused]
        best, ranked = choose_fusion(candidates, validation_p, perturbed_p)
        reason = choice_reason(best, ranked, candidates, len(fusion.validation), fusion.what) + fusion.reason_suffix
        fusion = FusionSpec(method=best.method, signals=list(best.signals), reason=reason)
    fusion_set_signals = signals_of(sets.fusion, "fusion calibration")
    fused = fused_calibration_scores(per_signal, fusion_set_signals, FusionRule(fusion.method, tuple(fusion.signals)))
    return Calibrated(per_signal, fused, fusion, ranked, fusion_set_signals)


def marginal_statement(count: int) -> str:
    """The split-conformal guarantee in words, for `count` fused calibration scores."""
    return (f"split conformal (marginal): averaged over calibration draws, the false-positive rate at alpha is at most alpha "
            f"({count} fused calibration scores; one bundle's realised rate at alpha 0.05 varies with its draw by about "
            f"+-{np.sqrt(0.05 * 0.95 / count):.3f}); the smallest alpha is 1/{count + 1}")


def calibration_spec(fused: np.ndarray, delta: float | None, default_alpha: float) -> tuple[CalibrationSpec, dict[str, np.ndarray]]:
    """The manifest's calibration block and the extra arrays for the fused calibration scores (m,): the marginal
    guarantee, or with `delta` the calibration-conditional band (`oodserve.models.build.conditional`). Refuses a
    band whose smallest p-value leaves `default_alpha` nothing to flag."""
    count = len(fused)
    if delta is None:
        return CalibrationSpec(file=CALIBRATION_FILE, statement=marginal_statement(count), minimum_alpha=1.0 / (count + 1)), {}
    band = conditional_band(count, delta)
    if band[0] >= default_alpha:
        raise ValueError(f"--guarantee conditional with delta {delta:g} over {count} fused calibration scores cannot flag anything at "
                         f"alpha {default_alpha:g} (its smallest p-value is {band[0]:.4f}); use more rows, a larger delta or alpha")
    spec = CalibrationSpec(file=CALIBRATION_FILE, guarantee="conditional", delta=delta,
                           statement=conditional_statement(delta, count, band), minimum_alpha=float(band[0]))
    return spec, {CONDITIONAL_KEY: band}


def write_calibrated_bundle(
    directory: Path, fitted: FittedSignals, calibrated: Calibrated, description: BundleDescription, delta: float | None = None
) -> Manifest:
    """Step 4: calibration.npz, the parameters files and a verified manifest.json (every file hashed) into `directory`;
    with `delta`, the calibration-conditional guarantee (`calibration_spec`)."""
    spec, extra = calibration_spec(calibrated.fused, delta, description.default_alpha)
    arrays = {**calibrated.per_signal, FUSED_CALIBRATION_KEY: calibrated.fused, **extra}
    return write_described_bundle(directory, description, fitted.manifest_entries, fitted.parameter_files, arrays, spec,
                                  calibrated.fusion)


def write_described_bundle(
    directory: Path,
    description: BundleDescription,
    signal_entries: Sequence[Mapping[str, Any]],
    parameter_files: Mapping[str, Mapping[str, np.ndarray]],
    arrays: Mapping[str, np.ndarray],
    spec: CalibrationSpec,
    fusion: FusionSpec,
) -> Manifest:
    """calibration.npz (`arrays`), the signals' and the description's parameters files and a verified manifest.json:
    the one place a builder's description, signal entries, calibration and fusion become a bundle (split or
    cross-conformal)."""
    write_signal_data(directory, arrays, {**parameter_files, **description.extra_files})
    manifest_fields: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "name": description.name,
        "version": description.version,
        "description": description.description,
        "input": description.input,
        "labels": description.labels,
        "models": description.models,
        "classifier": description.classifier,
        "signals": [SignalSpec.model_validate(entry) for entry in signal_entries],
        "calibration": spec,
        "fusion": fusion,
        "default_alpha": description.default_alpha,
        "provenance": description.provenance,
        "sampler": description.sampler,
        "batch_typicality": description.batch_typicality,
    }
    return write_bundle(directory, manifest_fields)


def calibrate_and_write(
    directory: Path,
    models: BundleModels,
    fitted: FittedSignals,
    sets: CalibrationSets,
    fusion: FusionSpec | FusionSearch,
    describe: Callable[[Calibrated], BundleDescription],
    delta: float | None = None,
) -> Manifest:
    """Calibrate the fitted signals on the held-out sets, settle the fusion rule and write the bundle into `directory`;
    `describe` gives the rest of the manifest once the calibration is known (its fusion search goes into the provenance);
    `delta` asks for the calibration-conditional guarantee."""
    calibrated = calibrate(models, fitted, sets, fusion)
    return write_calibrated_bundle(directory, fitted, calibrated, describe(calibrated), delta)


def fresh_staging(out: Path) -> Path:
    """An empty `OUT.staging` directory beside the bundle `out`, where a bundle is written before it replaces `out`."""
    staging = out.with_name(out.name + ".staging")
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def publish_staging(staging: Path, out: Path) -> None:
    """Replace the bundle `out` by the completed `staging` directory."""
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
