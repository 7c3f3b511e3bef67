"""The wall-clock budget of one fit: shares for the training stages, a reserve for everything else, and a
record of what each stage took."""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass
class Budget:
    """`total_seconds` for the whole fit, measured from construction. `reserve_fraction` of it is kept for
    export, calibration and the fusion choice; the training stages share the rest by weight."""

    total_seconds: float
    reserve_fraction: float = 0.2
    started: float = field(default_factory=time.monotonic)
    spent: dict[str, float] = field(default_factory=dict)
    planned: dict[str, float] = field(default_factory=dict)

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return max(self.total_seconds - self.elapsed(), 0.0)

    def plan(self, weights: dict[str, float], keep: dict[str, float] | None = None) -> None:
        """Split what is left, less the reserve, over the named training stages in proportion to `weights`;
        the plans in `keep` of stages not named in `weights` (those already run) stay as they were."""
        available = max(self.remaining() - self.reserve_fraction * self.total_seconds, 0.0)
        total = sum(weights.values()) or 1.0
        kept = {name: seconds for name, seconds in (keep or {}).items() if name not in weights}
        self.planned = {**kept, **{name: available * weight / total for name, weight in weights.items()}}

    def seconds_for(self, stage: str) -> float:
        """The planned seconds of `stage`, never more than what is left less the reserve."""
        return max(min(self.planned.get(stage, 0.0), self.remaining() - self.reserve_fraction * self.total_seconds), 1.0)

    def record(self, stage: str, seconds: float) -> None:
        self.spent[stage] = self.spent.get(stage, 0.0) + seconds

    def timed(self, stage: str) -> _Timer:
        """`with budget.timed("stage"):` records the block's wall time under `stage`."""
        return _Timer(self, stage)

    def split_text(self) -> str:
        """How the budget went: planned and spent seconds per stage, and the total against the budget."""
        parts = [f"{name} {self.spent.get(name, 0.0):.0f}s" + (f" (planned {self.planned[name]:.0f}s)" if name in self.planned else "")
                 for name in self.spent]
        return f"{self.elapsed():.0f}s of {self.total_seconds:.0f}s: " + ", ".join(parts)


class _Timer:
    def __init__(self, budget: Budget, stage: str) -> None:
        self.budget, self.stage = budget, stage

    def __enter__(self) -> _Timer:
        self.began = time.monotonic()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.budget.record(self.stage, time.monotonic() - self.began)
