"""Label-free choice of the fusion rule: which signals, combined how, judged only on self-made
perturbations of held-out in-distribution images (never on real OOD data).

Each candidate (method, subset of signals) is scored by its AUROC of in-distribution vs each
perturbation set; the objective is mean AUROC + worst-case AUROC, so a rule that one kind of
perturbation defeats loses to one that holds up everywhere. Ties go to fewer signals.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from models.evaluation.metrics import auroc
from service.scoring.fusion import fused_statistic


@dataclass(frozen=True)
class FusionCandidate:
    """One evaluated rule and its AUROC per perturbation set."""

    method: str
    signals: tuple[str, ...]
    auroc_by_set: dict[str, float]

    @property
    def objective(self) -> float:
        values = list(self.auroc_by_set.values())
        return float(np.mean(values) + np.min(values))


def evaluate_candidate(
    method: str,
    signals: Sequence[str],
    in_dist_p_values: Mapping[str, np.ndarray],
    perturbed_p_values: Mapping[str, Mapping[str, np.ndarray]],
) -> FusionCandidate:
    """AUROC of the fused statistic, in-distribution vs each perturbation set."""
    inside = fused_statistic(method, in_dist_p_values, signals)
    return FusionCandidate(
        method=method,
        signals=tuple(signals),
        auroc_by_set={
            name: auroc(inside, fused_statistic(method, p_values, signals))
            for name, p_values in perturbed_p_values.items()
        },
    )


def choose_fusion(
    candidate_signals: Sequence[str],
    in_dist_p_values: Mapping[str, np.ndarray],
    perturbed_p_values: Mapping[str, Mapping[str, np.ndarray]],
    methods: Sequence[str] = ("fisher", "min_p"),
    max_signals: int | None = None,
) -> tuple[FusionCandidate, list[FusionCandidate]]:
    """Best candidate and every candidate sorted best first, over all non-empty subsets."""
    largest = len(candidate_signals) if max_signals is None else min(max_signals, len(candidate_signals))
    candidates = [
        evaluate_candidate(method, subset, in_dist_p_values, perturbed_p_values)
        for size in range(1, largest + 1)
        for subset in itertools.combinations(candidate_signals, size)
        for method in (methods if size > 1 else methods[:1])
    ]
    ranked = sorted(candidates, key=lambda c: (-round(c.objective, 4), len(c.signals)))
    return ranked[0], ranked
