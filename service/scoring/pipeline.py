"""From model outputs to verdicts: signals -> conformal p-values -> fused statistic -> fused p-value -> is_ood."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from oodserve.bundle.calibration import FUSED_CALIBRATION_KEY, CalibrationScores  # noqa: F401  (the key is re-exported)
from oodserve.scoring.conformal import StackedCalibration, conditional_p_values, conformal_p_values
from oodserve.scoring.cross_conformal import cross_conformal_counts, cross_conformal_p_values, tail_extended_p_values
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
    """A bundle's sorted calibration scores ((n_k,) per signal, (m,) fused) with their conformal p-values; `groups`
    maps each reported signal to the declared signals it comes from (its K fold signals in a cross-conformal bundle)."""

    groups: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    stacked: StackedCalibration | None = field(init=False, repr=False, compare=False)
    """Every signal's scores in one array (per_signal's order): all p-values of a batch in one search."""

    def __post_init__(self) -> None:
        stacked = StackedCalibration([np.asarray(self.per_signal[name]) for name in self.per_signal]) if self.per_signal else None
        object.__setattr__(self, "stacked", stacked)

    @classmethod
    def of(cls, scores: CalibrationScores, groups: Mapping[str, Sequence[str]] | None = None) -> Calibration:
        """`groups` as `Manifest.signal_groups` gives them; by default every signal stands for itself."""
        named = {name: tuple(members) for name, members in (groups or {name: [name] for name in scores.per_signal}).items()}
        return cls(per_signal=scores.per_signal, fused=scores.fused, folds=scores.folds, held_out=scores.held_out,
                   fused_by_fold=scores.fused_by_fold, conditional=scores.conditional, groups=named)

    def reported_calibration(self) -> dict[str, np.ndarray]:
        """Reported signal -> its sorted held-out calibration scores: its own array, or for a cross-conformal bundle every
        fold's held-out scores together (each scored by its own fold's models)."""
        if not self.folds:
            return {name: np.asarray(self.per_signal[name]) for name in self.groups}
        return {name: np.sort(np.concatenate([self.held_out[member] for member in members])) for name, members in self.groups.items()}

    def fused_p_values(self, fused_scores: np.ndarray) -> np.ndarray:
        """(N,) p-values of fused statistics (N,): conformal, or calibration-conditional when the bundle has the band."""
        if self.conditional is not None:
            return conditional_p_values(self.conditional, self.fused, fused_scores)
        return conformal_p_values(self.fused, fused_scores)

    def cross_conformal(
        self, fusion: FusionRule, signals: Mapping[str, np.ndarray], p_values: Mapping[str, np.ndarray]
    ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray, np.ndarray]:
        """A cross-conformal bundle's verdict parts from its fold signals (N,) and their standardising p-values:
        (reported signals: the mean over folds, reported p-values: cross-conformal against the held-out scores, fused
        score: how many of the n held-out fused statistics the input's fold statistics exceed (0..n), fused p-value:
        (1 + n - score) / (n + 1)), all (N,) (`oodserve.scoring.cross_conformal`)."""
        fold_statistics = [
            fold_statistic(fusion, {name: self.groups[name][fold] for name in fusion.signals}, signals, self.per_signal, p_values)
            for fold in range(self.folds)
        ]
        counts = cross_conformal_counts(self.fused_by_fold, fold_statistics)
        total = float(self.fused.size)
        reported = {name: np.mean([signals[member] for member in members], axis=0) for name, members in self.groups.items()}
        reported_p = {
            name: cross_conformal_p_values([self.held_out[member] for member in members], [signals[member] for member in members])
            for name, members in self.groups.items()
        }
        return reported, reported_p, total - counts, (1.0 + counts) / (total + 1.0)

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
    calibration (calibration-conditional when the bundle has that guarantee); is_ood = fused p-value < alpha.
    A cross-conformal bundle reports its signals per reported name (`Calibration.cross_conformal`).
    """
    signals = compute_signals(definitions, outputs, images, prepared)
    p_values = calibration.signal_p_values(signals)
    if calibration.folds:
        signals, p_values, fused_score, fused_p_value = calibration.cross_conformal(fusion, signals, p_values)
    else:
        fused_score = fused_statistic(fusion.method, p_values, fusion.signals)
        fused_p_value = calibration.fused_p_values(fused_score)
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


def fold_statistic(
    fusion: FusionRule,
    members: Mapping[str, str],
    signals: Mapping[str, np.ndarray],
    standardising: Mapping[str, np.ndarray],
    p_values: Mapping[str, np.ndarray] | None = None,
) -> np.ndarray:
    """One fold's fused statistic T_k (N,) in a cross-conformal bundle: the fusion over `tail_extended_p_values` of the
    fold's signals. members: reported signal -> its fold signal; signals: fold signal -> (N,) values; standardising:
    fold signal -> its sorted standardising scores; p_values: their plain conformal p-values when already computed.
    The builder (held-out rows) and the engine (inputs) both call this."""
    extended = {
        name: tail_extended_p_values(standardising[member], signals[member], None if p_values is None else p_values[member])
        for name, member in members.items()
    }
    return fused_statistic(fusion.method, extended, fusion.signals)


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
