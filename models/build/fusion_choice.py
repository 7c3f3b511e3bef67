"""Label-free choice of the fusion rule: which signals, combined how, judged only on self-made
perturbations of held-out in-distribution images (never on real OOD data).

Each candidate (method, subset of signals) is scored by its AUROC of in-distribution vs each
perturbation set; the objective is mean AUROC + worst-case AUROC, so a rule that one kind of
perturbation defeats loses to one that holds up everywhere.

Which candidate is chosen accounts for how much the objective can tell apart: among the candidates
whose objective is within one standard error of the best (the Hanley and McNeil 1982 standard error of
the best rule's worst-case AUROC, large when the validation set is small), the one whose verdicts flag
the most perturbed inputs at alpha 0.05 (mean + worst case over the sets; the statistic ranked against
the in-distribution ones), within its binomial standard error, are kept, and of those the one pooling the
most signals is chosen: real OOD data may defeat any one
signal the perturbations happened to favour, while p-values that cannot fall below 1 / (n + 1) make a
rule diluted by many weak signals miss what one strong signal finds.

Below `MIN_VALIDATION_FOR_CHOICE` held-out rows the perturbations cannot tell rules apart (the AUROC
standard error exceeds about 0.02 and the worst-case set decides by a handful of inputs), so the choice
falls back to the uninformed default, Fisher's combination of every candidate signal at equal weight
(Fisher 1932); the ranked candidates are still returned for the record.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from oodserve.models.evaluation.metrics import auroc
from oodserve.scoring.fusion import fused_statistic


@dataclass(frozen=True)
class FusionCandidate:
    """One evaluated rule: its AUROC per perturbation set and the share of each perturbation set its
    verdict at VERDICT_ALPHA flags (fused statistics ranked against the in-distribution ones)."""

    method: str
    signals: tuple[str, ...]
    auroc_by_set: dict[str, float]
    detected_by_set: dict[str, float] = field(default_factory=dict)

    @property
    def objective(self) -> float:
        values = list(self.auroc_by_set.values())
        return float(np.mean(values) + np.min(values))

    @property
    def verdict_objective(self) -> float:
        values = list(self.detected_by_set.values()) or [0.0]
        return float(np.mean(values) + np.min(values))


VERDICT_ALPHA = 0.05
MIN_VALIDATION_FOR_CHOICE = 200


def detected_share(inside: np.ndarray, outside: np.ndarray, alpha: float = VERDICT_ALPHA) -> float:
    """Share of `outside` statistics whose conformal p-value against `inside` is below alpha."""
    ordered = np.sort(inside)
    count_at_least = len(ordered) - np.searchsorted(ordered, outside, side="left")
    return float(np.mean((1.0 + count_at_least) / (len(ordered) + 1.0) < alpha))


def evaluate_candidate(
    method: str,
    signals: Sequence[str],
    in_dist_p_values: Mapping[str, np.ndarray],
    perturbed_p_values: Mapping[str, Mapping[str, np.ndarray]],
) -> FusionCandidate:
    """AUROC and verdict detection rate of the fused statistic, in-distribution vs each perturbation set."""
    inside = fused_statistic(method, in_dist_p_values, signals)
    outside = {name: fused_statistic(method, p_values, signals) for name, p_values in perturbed_p_values.items()}
    return FusionCandidate(
        method=method,
        signals=tuple(signals),
        auroc_by_set={name: auroc(inside, values) for name, values in outside.items()},
        detected_by_set={name: detected_share(inside, values) for name, values in outside.items()},
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
    if min(sizes) < MIN_VALIDATION_FOR_CHOICE:
        default = next((c for c in candidates if c.method == methods[0] and len(c.signals) == largest), None)
        if default is not None and largest == len(candidate_signals):
            return default, ranked
    tolerance = auroc_standard_error(min(ranked[0].auroc_by_set.values()), *sizes)
    close = [candidate for candidate in ranked if candidate.objective >= ranked[0].objective - tolerance]
    best_verdicts = max(candidate.verdict_objective for candidate in close)
    worst_set = min(len(next(iter(p.values()))) for p in perturbed_p_values.values())
    verdict_tolerance = 2.0 * 0.5 / float(np.sqrt(max(worst_set, 1)))  # mean + min of shares: twice the largest binomial SE
    pooled = [candidate for candidate in close if candidate.verdict_objective >= best_verdicts - verdict_tolerance]
    return max(pooled, key=lambda c: (len(c.signals), c.verdict_objective, c.objective)), ranked


def choice_reason(best: FusionCandidate, ranked: Sequence[FusionCandidate], candidates: Sequence[str], held_out: int, what: str) -> str:
    """Why `best` is the fusion, for the manifest: `held_out` validation rows against self-made perturbations of `what`."""
    scores = ", ".join(f"{name} {value:.3f}" for name, value in best.auroc_by_set.items())
    if held_out < MIN_VALIDATION_FOR_CHOICE and len(best.signals) == len(candidates) and best.method == "fisher":
        return (f"Fisher over every signal: {held_out} held-out {what} are too few (< {MIN_VALIDATION_FOR_CHOICE}) for the "
                f"perturbations to tell {len(ranked)} rules apart; its AUROC vs self-made perturbations: {scores}")
    return (f"chosen label-free among {len(ranked)} rules (fisher/min_p over subsets of {list(candidates)}) by mean + worst-case "
            f"AUROC of {held_out} held-out {what} vs self-made perturbations ({scores})")


def auroc_standard_error(area: float, negatives: int, positives: int) -> float:
    """Standard error of an AUROC estimate from `negatives` and `positives` scores (Hanley and McNeil 1982)."""
    q1, q2 = area / (2.0 - area), 2.0 * area**2 / (1.0 + area)
    variance = (area * (1.0 - area) + (positives - 1) * (q1 - area**2) + (negatives - 1) * (q2 - area**2)) / max(negatives * positives, 1)
    return float(np.sqrt(max(variance, 0.0)))
