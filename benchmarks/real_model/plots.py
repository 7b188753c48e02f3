"""One figure per experiment, drawn from its result rows: a bar panel per metric (95% intervals as
error bars), a panel of the paired differences between methods that the success criterion reads
(with its threshold), and, where the experiment kept them, the curves measured at each checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

from thoughtfold.render import pyplot

CURVE_LABELS = {"recall-words": "held-out answer NLL (nats)", "gsm8k-distill": "validation KL after eviction"}
# the difference each experiment's criterion reads, and where its threshold sits in the settings
DIFFERENCES = {"recall-words": ("accuracy", "min_accuracy_gain", 1.0),
               "gsm8k-distill": ("kl_relative", "min_relative_kl_gain", -1.0)}


def _guards(experiment: dict) -> dict[str, float]:
    """The per-arm floors of word recall's guard criteria: format rate and item entropy."""
    settings = experiment.get("settings", {})
    c, items = settings.get("criteria", {}), settings.get("task", {}).get("items")
    if "min_format_rate" not in c or not items:
        return {}
    return {"format_rate": c["min_format_rate"],
            "item_entropy_bits": math.log2(len(items)) - c["max_entropy_gap_bits"]}


def _difference_rows(experiment: dict) -> list[dict]:
    """The paired differences (with intervals) that the experiment's criterion reads."""
    if experiment["name"] not in DIFFERENCES:
        return []
    metric = DIFFERENCES[experiment["name"]][0]
    return [r for r in experiment["rows"] if "-" in r["method"] and r["metric"] == metric and "lo" in r]


def _differences(ax, experiment: dict, mine: list[dict]) -> None:
    metric, key, sign = DIFFERENCES[experiment["name"]]
    names = [r["method"].replace("-", " - ") for r in mine]
    ax.barh(names, [r["value"] for r in mine], color="#DD8452")
    for name, r in zip(names, mine, strict=True):
        ax.errorbar(r["value"], name, xerr=[[r["value"] - r["lo"]], [r["hi"] - r["value"]]], color="black",
                    capsize=3)
    ax.axvline(0, color="gray", linewidth=1)
    threshold = experiment.get("settings", {}).get("criteria", {}).get(key)
    if threshold is not None:
        ax.axvline(sign * threshold, color="firebrick", linestyle="--", linewidth=1, label="criterion")
        ax.legend(fontsize=7)
    ax.set_title(f"paired {metric} difference (95%)", fontsize=9)
    ax.tick_params(labelsize=7)


def plot_experiment(experiment: dict, path: Path) -> Path:
    rows = [r for r in experiment["rows"] if "-" not in r["method"] or "@" in r["method"]]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    curves = experiment.get("curves") or {}
    differences = _difference_rows(experiment)
    guards = _guards(experiment)
    plt = pyplot()
    panels = len(metrics) + bool(differences) + bool(curves)
    fig, axes = plt.subplots(1, panels, figsize=(3.4 * panels, 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=False):
        mine = [r for r in rows if r["metric"] == metric]
        names = [r["method"] for r in mine]
        ax.bar(names, [r["value"] for r in mine], color="#4C72B0")
        for r in mine:
            if "lo" in r:
                ax.errorbar(r["method"], r["value"], yerr=[[r["value"] - r["lo"]], [r["hi"] - r["value"]]],
                            color="black", capsize=3)
        if metric in guards:
            ax.axhline(guards[metric], color="firebrick", linestyle="--", linewidth=1, label="criterion")
            ax.legend(fontsize=7)
        if metric == "accuracy" and "chance" in experiment:
            ax.axhline(experiment["chance"], color="gray", linestyle="--", linewidth=1, label="chance")
            ax.legend(fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.tick_params(axis="x", labelrotation=35)
    if differences:
        _differences(axes[0][len(metrics)], experiment, differences)
    if curves:
        ax = axes[0][-1]
        for arm, points in curves.items():
            ax.plot([s for s, _ in points], [v for _, v in points], marker="o", markersize=3, label=arm)
        ax.set_xlabel("training step", fontsize=8)
        ax.set_title(CURVE_LABELS.get(experiment["name"], "per checkpoint"), fontsize=9)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"{experiment['name']} (W = {experiment['window']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
