"""From model outputs to verdicts: signals -> conformal p-values -> fused statistic -> fused p-value -> is_ood."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from oodserve.bundle.calibration import FUSED_CALIBRATION_KEY, CalibrationScores  # noqa: F401  (the key is re-exported)
from oodserve.scoring.conformal import StackedCalibration, conformal_p_values
from oodserve.scoring.fusion import fused_statistic
from oodserve.scoring.signals import SIGNAL_KINDS, ModelOutputs, SignalSource, softmax


@dataclass(frozen=True)
class SignalDefinition:
    """One declared signal: its name, registered kind, source output, the manifest's JSON parameters and the arrays of
    its parameters file (name -> ndarray; empty without one)."""

    name: str
    kind: str
    source: SignalSource
    params: Mapping[str, Any]
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class FusionRule:
    """How per-signal p-values combine: method in `FUSION_METHODS`, over the named signals."""

    method: str
    signals: tuple[str, ...]


@dataclass(frozen=True)
class Calibration(CalibrationScores):
    """A bundle's sorted calibration scores ((n_k,) per signal, (m,) fused) with their conformal p-values."""

    stacked: StackedCalibration | None = field(init=False, repr=False, compare=False)
    """Every signal's scores in one array (per_signal's order): all p-values of a batch in one search."""

    def __post_init__(self) -> None:
        stacked = StackedCalibration([np.asarray(self.per_signal[name]) for name in self.per_signal]) if self.per_signal else None
        object.__setattr__(self, "stacked", stacked)

    @classmethod
    def of(cls, scores: CalibrationScores) -> Calibration:
        return cls(per_signal=scores.per_signal, fused=scores.fused)

    def signal_p_values(self, signals: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """name -> (N,) conformal p-values of every signal in `signals` (each (N,)), all in one search when
        they are exactly the calibrated signals."""
        if self.stacked is None or signals.keys() != self.per_signal.keys():
            return {name: conformal_p_values(self.per_signal[name], values) for name, values in signals.items()}
        p_values = self.stacked.p_values(np.stack([np.asarray(signals[name], dtype=np.float64) for name in self.per_signal]))
        rows = dict(zip(self.per_signal, p_values))
        return {name: rows[name] for name in signals}


class Prediction(BaseModel):
    """The classifier's answer for one instance."""

    model_config = ConfigDict(frozen=True)

    class_index: int
    label: str
    confidence: float


class InstanceResult(BaseModel):
    """The verdict for one instance: the one typed result, which the v1 response and its OpenAPI schema both use."""

    model_config = ConfigDict(frozen=True)

    is_ood: bool = Field(description="p_value < alpha")
    score: float = Field(description="Fused statistic, higher = more OOD.")
    p_value: float = Field(description="Conformal p-value of the fused statistic.")
    signals: dict[str, float]
    p_values: dict[str, float]
    prediction: Prediction | None = Field(None, description="Present when the bundle has a classifier (omitted otherwise).")


@dataclass(frozen=True)
class BatchScores:
    """Scores of a batch of N instances, as arrays (N,) keyed like the manifest."""

    signals: dict[str, np.ndarray]
    p_values: dict[str, np.ndarray]
    fused_score: np.ndarray
    fused_p_value: np.ndarray
    is_ood: np.ndarray
    alpha: float
    predicted_class: np.ndarray | None
    confidence: np.ndarray | None

    def to_instance_results(self, labels: Sequence[str] | None) -> list[InstanceResult]:
        """One `InstanceResult` per instance, in batch order; labels default to the class index as text."""
        names = list(self.signals)
        signal_rows = {name: self.signals[name].tolist() for name in names}
        p_value_rows = {name: self.p_values[name].tolist() for name in names}
        fused_scores = self.fused_score.tolist()
        fused_p_values = self.fused_p_value.tolist()
        verdicts = self.is_ood.tolist()
        classes = self.predicted_class.tolist() if self.predicted_class is not None else None
        confidences = self.confidence.tolist() if self.confidence is not None else None
        results: list[InstanceResult] = []
        for index in range(len(verdicts)):
            prediction = None
            if classes is not None and confidences is not None:
                class_index = int(classes[index])
                label = labels[class_index] if labels is not None and class_index < len(labels) else str(class_index)
                prediction = Prediction.model_construct(class_index=class_index, label=label, confidence=float(confidences[index]))
            results.append(
                InstanceResult.model_construct(
                    is_ood=bool(verdicts[index]),
                    score=float(fused_scores[index]),
                    p_value=float(fused_p_values[index]),
                    signals={name: float(signal_rows[name][index]) for name in names},
                    p_values={name: float(p_value_rows[name][index]) for name in names},
                    prediction=prediction,
                )
            )
        return results


def prepare_signals(definitions: Sequence[SignalDefinition], images: np.ndarray) -> dict[str, np.ndarray]:
    """The input-only parts of the declared signals whose kinds have one (`SignalKind.prepare`): name -> (N,).
    images: (N, *input_shape) raw scale; needs no model output, so it can run beside the models."""
    prepared: dict[str, np.ndarray] = {}
    for definition in definitions:
        prepare = SIGNAL_KINDS[definition.kind].prepare
        if prepare is not None:
            prepared[definition.name] = prepare(images, definition.params)
    return prepared


def compute_signals(
    definitions: Sequence[SignalDefinition],
    outputs: ModelOutputs,
    images: np.ndarray,
    prepared: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Evaluate every declared signal on a batch. images: (N, *input_shape) raw scale; prepared: `prepare_signals`
    of the same images, when computed ahead. -> name -> (N,) float64."""
    batch_size = images.shape[0]
    values: dict[str, np.ndarray] = {}
    for definition in definitions:
        kind = SIGNAL_KINDS[definition.kind]
        ahead = prepared.get(definition.name) if prepared is not None else None
        signal = np.asarray(
            kind.score(outputs, images, definition.source, definition.params, arrays=definition.arrays, prepared=ahead), dtype=np.float64
        )
        if signal.shape != (batch_size,):
            raise ValueError(f"signal {definition.name!r} returned shape {list(signal.shape)}, expected [{batch_size}]")
        values[definition.name] = signal
    return values


def classifier_predictions(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """argmax class (N,) int64 and its softmax probability (N,) float64 from (N, C) logits."""
    probabilities = softmax(np.asarray(logits, dtype=np.float64).reshape(logits.shape[0], -1))
    predicted = np.argmax(probabilities, axis=1)
    return predicted, probabilities[np.arange(predicted.size), predicted]


def score_outputs(
    definitions: Sequence[SignalDefinition],
    calibration: Calibration,
    fusion: FusionRule,
    outputs: ModelOutputs,
    images: np.ndarray,
    alpha: float,
    classifier_logits: SignalSource | None = None,
    prepared: Mapping[str, np.ndarray] | None = None,
) -> BatchScores:
    """The full verdict for a batch whose model outputs are already computed.

    p_k = conformal p-value of signal k against its calibration scores; the fused statistic
    (fusion.method over fusion.signals) gets its own conformal p-value against the fused
    calibration; is_ood = fused p-value < alpha.
    """
    signals = compute_signals(definitions, outputs, images, prepared)
    p_values = calibration.signal_p_values(signals)
    fused_score = fused_statistic(fusion.method, p_values, fusion.signals)
    fused_p_value = conformal_p_values(calibration.fused, fused_score)
    predicted_class = confidence = None
    if classifier_logits is not None:
        logits = np.asarray(outputs[classifier_logits.model][classifier_logits.output])
        predicted_class, confidence = classifier_predictions(logits)
    return BatchScores(
        signals=signals,
        p_values=p_values,
        fused_score=fused_score,
        fused_p_value=fused_p_value,
        is_ood=fused_p_value < alpha,
        alpha=alpha,
        predicted_class=predicted_class,
        confidence=confidence,
    )


def fused_calibration_scores(
    per_signal_calibration: Mapping[str, np.ndarray],
    second_split_signals: Mapping[str, np.ndarray],
    fusion: FusionRule,
) -> np.ndarray:
    """Fused statistics of a second in-distribution split, for the `__fused__` calibration array.

    per_signal_calibration: sorted (n_k,) scores of the first split; second_split_signals: (m,)
    raw signal values of the second split. Bundle builders call this; returns (m,) float64.
    """
    p_values = {
        name: conformal_p_values(per_signal_calibration[name], second_split_signals[name]) for name in fusion.signals
    }
    return fused_statistic(fusion.method, p_values, fusion.signals)
