"""What a fit returns and prints: the bundle, the manifest and the summary rows of the table at the end."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from oodserve.models.fit.budget import Budget


@dataclass
class FitResult:
    """Where the bundle went and the summary rows printed at the end."""

    bundle: Path
    summary: list[tuple[str, str]] = field(default_factory=list)
    manifest: dict[str, Any] = field(default_factory=dict)


def figure_text(values: dict[str, Any]) -> str:
    """`key value, ...` with floats to 4 significant digits."""
    return ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in values.items())


def closing_rows(manifest: dict[str, Any], minimum_alpha: float, budget: Budget) -> list[tuple[str, str]]:
    """The rows every fit ends with: the fusion and why, the alphas, how the budget went."""
    fusion, calibration = manifest["fusion"], manifest["calibration"]
    conditional = calibration.get("guarantee") == "conditional"
    smallest = calibration.get("minimum_alpha") or minimum_alpha
    return [
        ("fusion", f"{fusion['method']} over {fusion['signals']}"),
        ("why", fusion["reason"]),
        ("method", calibration.get("statement") or "split conformal"),
        ("alpha", f"default {manifest['default_alpha']:g}; minimum supported {smallest:.4f} "
                  + ("(the smallest calibration-conditional p-value)" if conditional else "(1 / (fusion calibration + 1))")),
        ("budget", budget.split_text()),
    ]
