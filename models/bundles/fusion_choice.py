"""Label-free choice of the fusion rule: which signals, combined how, judged only on self-made
perturbations of held-out in-distribution images (never on real OOD data).

Each candidate (method, subset of signals) is scored by its AUROC of in-distribution vs each
perturbation set; the objective is mean AUROC + worst-case AUROC, so a rule that one kind of
perturbation defeats loses to one that holds up everywhere.

Which candidate is chosen accounts for how much the objective can tell apart: among the candidates
whose objective is within one standard error of the best (the Hanley and McNeil 1982 standard error of
the best rule's worst-case AUROC, large when the validation set is small), the one that pools the most
signals is chosen, since real OOD data may defeat any one signal the perturbations happened to favour.
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
    sizes = (len(next(iter(in_dist_p_values.values()))), min(len(next(iter(p.values()))) for p in perturbed_p_values.values()))
    tolerance = auroc_standard_error(min(ranked[0].auroc_by_set.values()), *sizes)
    close = [candidate for candidate in ranked if candidate.objective >= ranked[0].objective - tolerance]
    return max(close, key=lambda c: (len(c.signals), c.objective)), ranked


def auroc_standard_error(area: float, negatives: int, positives: int) -> float:
    """Standard error of an AUROC estimate from `negatives` and `positives` scores (Hanley and McNeil 1982)."""
    q1, q2 = area / (2.0 - area), 2.0 * area**2 / (1.0 + area)
    variance = (area * (1.0 - area) + (positives - 1) * (q1 - area**2) + (negatives - 1) * (q2 - area**2)) / max(negatives * positives, 1)
    return float(np.sqrt(max(variance, 0.0)))
