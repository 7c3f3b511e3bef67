"""Evaluation report: metric tables in Markdown plus ROC curves and score histograms as PNG."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from oodserve.models.evaluation.metrics import DetectionMetrics, detection_metrics, expected_calibration_error

ALPHAS = (0.01, 0.05, 0.10)


@dataclass
class ScoredSet:
    """Everything the engine returned for one data set, as arrays of length N."""

    name: str
    signals: dict[str, np.ndarray]
    score: np.ndarray
    p_value: np.ndarray
    class_probabilities: np.ndarray | None = None
    labels: np.ndarray | None = None
    extra: dict[str, float] = field(default_factory=dict)


def metrics_table(in_dist: ScoredSet, ood: ScoredSet, raw_keys: list[str]) -> dict[str, DetectionMetrics]:
    """Detection metrics per signal and for the fused score (key `score`), in-dist vs one OOD set."""
    table = {key: detection_metrics(in_dist.signals[key], ood.signals[key]) for key in raw_keys}
    table["score (fused)"] = detection_metrics(in_dist.score, ood.score)
    return table


def false_positive_rates(p_values: np.ndarray, alphas: tuple[float, ...] = ALPHAS) -> dict[float, float]:
    """Empirical fraction of in-distribution inputs with p < alpha (should be at most alpha)."""
    return {alpha: float(np.mean(p_values < alpha)) for alpha in alphas}


def _plot_roc(in_dist: ScoredSet, ood: ScoredSet, keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    figure, axis = plt.subplots(figsize=(5.5, 5))
    labels = np.concatenate([np.zeros(len(in_dist.score)), np.ones(len(ood.score))])
    for key in keys + ["score (fused)"]:
        inside = in_dist.score if key == "score (fused)" else in_dist.signals[key]
        outside = ood.score if key == "score (fused)" else ood.signals[key]
        fpr, tpr, _ = roc_curve(labels, np.concatenate([inside, outside]))
        auroc = detection_metrics(inside, outside).auroc
        axis.plot(fpr, tpr, lw=2.5 if key == "score (fused)" else 1.2, label=f"{key} ({auroc:.3f})")
    axis.plot([0, 1], [0, 1], "k:", lw=0.8)
    axis.set_xlabel("false-positive rate (in-distribution flagged)")
    axis.set_ylabel("true-positive rate (OOD flagged)")
    axis.set_title(f"ROC: {in_dist.name} vs {ood.name}")
    axis.legend(fontsize=7, loc="lower right")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot_histograms(sets: list[ScoredSet], keys: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = keys + ["score (fused)", "p_value"]
    columns = 3
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows))
    for axis, key in zip(np.ravel(axes), panels):
        values = {
            s.name: (s.score if key == "score (fused)" else s.p_value if key == "p_value" else s.signals[key])
            for s in sets
        }
        finite = np.concatenate([v[np.isfinite(v)] for v in values.values()])
        low, high = np.percentile(finite, [0.5, 99.5])
        bins = np.linspace(low, high if high > low else low + 1, 60)
        colour_map = plt.get_cmap("tab20")  # 20 listed colours: colour_map(i) is the i-th
        for index, (name, value) in enumerate(values.items()):
            axis.hist(np.clip(value, low, high), bins=bins, histtype="step", density=True, label=name,
                      color=colour_map(index % colour_map.N), linewidth=2.0 if index == 0 else 1.0)
        axis.set_title(key, fontsize=9)
        axis.tick_params(labelsize=7)
    for axis in np.ravel(axes)[len(panels) :]:
        axis.axis("off")
    np.ravel(axes)[0].legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_report(
    out_dir: Path,
    bundle_name: str,
    in_dist: ScoredSet,
    ood_sets: list[ScoredSet],
    fusion_description: str,
    header_lines: list[str] | None = None,
) -> Path:
    """Write `report.md` with PNG plots into `out_dir`; returns the Markdown path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = list(in_dist.signals)
    lines = [f"# Evaluation of bundle `{bundle_name}`", ""]
    lines += header_lines or []
    lines += ["", f"In-distribution: **{in_dist.name}** ({len(in_dist.score)} images). Fusion: {fusion_description}", ""]

    lines += ["## Verdict false-positive rate on held-out in-distribution data", "", "| alpha | fraction flagged OOD |", "|---|---|"]
    for alpha, rate in false_positive_rates(in_dist.p_value).items():
        lines.append(f"| {alpha:.2f} | {rate:.4f} |")
    lines.append("")

    if in_dist.class_probabilities is not None and in_dist.labels is not None:
        accuracy = float(np.mean(in_dist.class_probabilities.argmax(axis=1) == in_dist.labels))
        ece = expected_calibration_error(in_dist.class_probabilities, in_dist.labels)
        lines += ["## Classifier", "", f"Accuracy {accuracy:.4f}, ECE (15 bins) {ece:.4f}.", ""]
    if in_dist.extra:
        lines += ["## Density model", ""] + [f"- {k}: {v:.4f}" for k, v in in_dist.extra.items()] + [""]

    lines += ["## Detection (AUROC / AUPR / FPR at 95% TPR; higher score = more OOD)", ""]
    summary_header = "| OOD set | " + " | ".join(keys + ["score (fused)"]) + " |"
    lines += ["AUROC summary:", "", summary_header, "|" + "---|" * (len(keys) + 2)]
    tables = {ood.name: metrics_table(in_dist, ood, keys) for ood in ood_sets}
    for ood in ood_sets:
        row = tables[ood.name]
        lines.append(f"| {ood.name} | " + " | ".join(f"{row[k].auroc:.4f}" for k in keys + ["score (fused)"]) + " |")
    lines.append("")
    for ood in ood_sets:
        roc_name = f"roc_{ood.name}.png"
        _plot_roc(in_dist, ood, keys, out_dir / roc_name)
        lines += [f"### {in_dist.name} vs {ood.name} ({len(ood.score)} images)", "",
                  "| signal | AUROC | AUPR | FPR@95%TPR | flagged at alpha 0.05 |", "|---|---|---|---|---|"]
        for key, metric in tables[ood.name].items():
            lines.append(f"| {key} | {metric.auroc:.4f} | {metric.aupr:.4f} | {metric.fpr_at_95_tpr:.4f} | "
                         + (f"{np.mean(ood.p_value < 0.05):.4f}" if key == "score (fused)" else "") + " |")
        lines += ["", f"![ROC {ood.name}]({roc_name})", ""]
    _plot_histograms([in_dist] + ood_sets, keys, out_dir / "histograms.png")
    lines += ["## Score histograms", "", "![histograms](histograms.png)", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
