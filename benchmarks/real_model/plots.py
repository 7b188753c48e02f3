"""One figure per experiment, drawn from its result rows: a bar panel per metric (95% intervals as
error bars; differences between methods left out) and, where the experiment kept them, the curves
measured at each checkpoint."""

from __future__ import annotations

from pathlib import Path

from thoughtfold.render import pyplot

CURVE_LABELS = {"recall-words": "held-out answer NLL (nats)", "gsm8k-distill": "validation KL after eviction"}


def plot_experiment(experiment: dict, path: Path) -> Path:
    rows = [r for r in experiment["rows"] if "-" not in r["method"] or "@" in r["method"]]
    metrics = list(dict.fromkeys(r["metric"] for r in rows))
    curves = experiment.get("curves") or {}
    plt = pyplot()
    panels = len(metrics) + bool(curves)
    fig, axes = plt.subplots(1, panels, figsize=(3.4 * panels, 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=False):
        mine = [r for r in rows if r["metric"] == metric]
        names = [r["method"] for r in mine]
        ax.bar(names, [r["value"] for r in mine], color="#4C72B0")
        for r in mine:
            if "lo" in r:
                ax.errorbar(r["method"], r["value"], yerr=[[r["value"] - r["lo"]], [r["hi"] - r["value"]]],
                            color="black", capsize=3)
        if metric == "accuracy" and "chance" in experiment:
            ax.axhline(experiment["chance"], color="gray", linestyle="--", linewidth=1, label="chance")
            ax.legend(fontsize=7)
        ax.set_title(metric, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.tick_params(axis="x", labelrotation=35)
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
