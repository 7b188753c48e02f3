"""Output helpers shared by everything that prints tables and draws plots (training, eval, report,
bench): one markdown table format, one headless pyplot set-up, and the metric-against-step curves
a training run and a report both draw."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table with padded columns (reads aligned in a terminal, too)."""
    cells = [[str(h) for h in header]] + [[str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend (no display needed), imported on first use
    because matplotlib is slow to import and only plotting needs it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(runs: dict[str, list[dict]], key: str, path: Path, title: str) -> Path | None:
    """``key`` against the step, one line per run (raw, faint) plus a moving average; None if no
    run logged ``key``."""
    curves = {}
    for label, records in runs.items():
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        if points:
            curves[label] = points
    if not curves:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, points in curves.items():
        steps, values = zip(*points, strict=True)
        span = max(1, len(values) // 10)
        if span > 1:
            line = ax.plot(steps, values, alpha=0.25)[0]
            smooth = [sum(values[max(0, i - span + 1) : i + 1]) / len(values[max(0, i - span + 1) : i + 1])
                      for i in range(len(values))]
            ax.plot(steps, smooth, color=line.get_color(), label=f"{label} (avg of {span})")
        else:
            ax.plot(steps, values, marker="o" if len(values) < 50 else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(f"{title} during training")
    return save_plot(fig, ax, path)


def save_plot(fig, ax, path: Path) -> Path:
    """Grid, legend, tight layout, PNG, and free the figure."""
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path
