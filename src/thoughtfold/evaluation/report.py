"""`thoughtfold report RUN_DIR...`: one markdown page and PNG plots comparing runs.

A RUN_DIR may hold an evaluation (``summary.json`` from `thoughtfold eval`, found up to three levels
down, e.g. ``runs/pte/eval/summary.json``) and/or a training run (``metrics.jsonl`` and
``config.yaml`` from `thoughtfold train`). The report has

* per dataset, a table of pass@1 (and pass@K) by method and window, and a plot of accuracy against
  the cache window, one line per method (``accuracy_<dataset>.png``);
* a table of training runs (method, window, steps, first / final / best reward, loss, memory,
  time per step) and reward / loss curves (``reward.png``, ``loss.png``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import DataError
from ..persist import output_directory
from ..render import markdown_table, plot_curves, pyplot, save_plot
from ..training.metrics import METRICS_NAME, PEAK_MEMORY, read_metrics
from .evaluate import SUMMARY_NAME, pct, window_name

REPORT_NAME = "report.md"


@dataclass
class EvalRun:
    name: str
    path: Path
    summary: dict


@dataclass
class TrainRun:
    name: str
    path: Path
    records: list[dict]
    config: dict = field(default_factory=dict)


# --------------------------------------------------------------------------- discovery


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read {path}: {e}") from None


def _read_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def _summaries_under(path: Path, depth: int = 3) -> list[Path]:
    found = []
    for level in range(depth + 1):
        found += sorted(path.glob("/".join(["*"] * level + [SUMMARY_NAME])))
    return [p for p in found if p.is_file()]


def _run_name(path: Path, root: Path) -> str:
    """A readable name: the run directory, plus the sub-path to the evaluation if nested."""
    rel = path.relative_to(root) if path != root else Path()
    return "/".join([root.resolve().name, *rel.parts]) if rel.parts else root.resolve().name


def discover(paths: list[str | Path]) -> tuple[list[EvalRun], list[TrainRun]]:
    """Evaluation summaries and training logs under each path (a directory, or a summary.json /
    metrics.jsonl file). A path with neither raises DataError."""
    evals: list[EvalRun] = []
    trains: list[TrainRun] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise DataError(f"run directory {raw} not found")
        if path.is_file():
            root, summaries = path.parent, ([path] if path.suffix == ".json" else [])
            metrics = path if path.name.endswith(".jsonl") else None
        else:
            root, summaries = path, _summaries_under(path)
            metrics = path / METRICS_NAME if (path / METRICS_NAME).is_file() else None
        found = 0
        for s in summaries:
            summary = _read_json(s)
            if not isinstance(summary, dict) or not isinstance(summary.get("results"), list):
                if path.is_file():
                    raise DataError(f"{s} is not a thoughtfold eval summary (no 'results' list)")
                continue  # some other tool's summary.json under the run directory
            evals.append(EvalRun(_run_name(s.parent, root), s.parent, summary))
            found += 1
        if metrics is not None:
            trains.append(TrainRun(root.resolve().name, root, read_metrics(metrics), _read_config(root)))
        if not found and metrics is None:
            raise DataError(f"{raw}: no eval summary ({SUMMARY_NAME}) or training log ({METRICS_NAME}) found")
    return evals, trains


# --------------------------------------------------------------------------- labels


def _unique_labels(base: list[str], names: list[str]) -> list[str]:
    """``base`` labels, with the run name added where a label repeats."""
    counts = {b: base.count(b) for b in base}
    return [b if counts[b] == 1 else f"{b} [{n}]" for b, n in zip(base, names, strict=True)]


def eval_labels(evals: list[EvalRun]) -> list[str]:
    return _unique_labels([str(e.summary.get("method") or e.name) for e in evals], [e.name for e in evals])


def train_labels(trains: list[TrainRun]) -> list[str]:
    return [t.name for t in trains]


def _slug(text: str) -> str:
    stem = Path(text).stem if text.endswith((".jsonl", ".json", ".parquet", ".csv")) else text
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", stem).strip("_") or "dataset"


def _dataset_label(name: str) -> str:
    return Path(name).name if name.endswith((".jsonl", ".json", ".parquet", ".csv")) else name


def _window_order(window: int | None) -> float:
    return math.inf if window is None else float(window)


# --------------------------------------------------------------------------- accuracy


def accuracy_section(evals: list[EvalRun], out: Path) -> tuple[list[str], list[Path]]:
    """Per dataset: a method x window table of pass@1 (pass@K) and the accuracy-vs-window plot."""
    labels = eval_labels(evals)
    datasets: list[str] = []
    for e in evals:
        for r in e.summary["results"]:
            if r["dataset"] not in datasets:
                datasets.append(r["dataset"])
    lines, plots = [], []
    for dataset in datasets:
        series: dict[str, dict[int | None, dict]] = {}
        for label, e in zip(labels, evals, strict=True):
            for r in e.summary["results"]:
                if r["dataset"] == dataset:
                    series.setdefault(label, {})[r["window"]] = r
        windows = sorted({w for s in series.values() for w in s}, key=_window_order)
        ks = sorted({int(k) for s in series.values() for r in s.values() for k in r.get("pass@k", {})})
        top = ks[-1] if ks else 1
        header = ["method", *[f"W={window_name(w)}" for w in windows]]
        rows = []
        for label, by_window in series.items():
            cells = []
            for w in windows:
                r = by_window.get(w)
                if r is None:
                    cells.append("")
                    continue
                cell = pct(r.get("pass@1"))
                k = max((int(k) for k in r.get("pass@k", {})), default=1)
                if k > 1:
                    cell += f" ({pct(r['pass@k'][str(k)])})"
                if not r.get("complete", True):
                    cell += "*"
                cells.append(cell)
            rows.append([label, *cells])
        problems = sorted({r["problems"] for s in series.values() for r in s.values()})
        samples = sorted({r["n_samples"] for s in series.values() for r in s.values()})
        lines.append(f"### {_dataset_label(dataset)}")
        lines.append("")
        note = f"pass@1 % (pass@{top} %)" if top > 1 else "pass@1 %"
        lines.append(f"{note} by cache window; {'/'.join(map(str, problems))} problems, "
                     f"{'/'.join(map(str, samples))} samples per problem. W=full is the full cache.")
        lines.append("")
        lines.append(markdown_table(header, rows))
        if any(not r.get("complete", True) for s in series.values() for r in s.values()):
            lines.append("")
            lines.append("\\* evaluation incomplete (interrupted); the number covers the finished samples.")
        plot = out / f"accuracy_{_slug(dataset)}.png"
        plot_accuracy(series, windows, plot, _dataset_label(dataset))
        lines += ["", f"![accuracy vs window, {_dataset_label(dataset)}]({plot.name})", ""]
        plots.append(plot)
    return lines, plots


def plot_accuracy(series: dict[str, dict[int | None, dict]], windows: list[int | None], path: Path,
                  title: str) -> Path:
    """pass@1 (%) against the window (log2 axis), one line per method; the full cache sits at the
    right end, labelled 'full'."""
    plt = pyplot()
    finite = [w for w in windows if w is not None]
    full_x = (max(finite) * 2) if finite else 1
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for label, by_window in series.items():
        points = sorted(((full_x if w is None else w), r["pass@1"]) for w, r in by_window.items()
                        if r.get("pass@1") is not None)
        if not points:
            continue
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, [100 * y for y in ys], marker="o", label=label)
    ticks = [full_x if w is None else w for w in windows]
    if finite:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, [window_name(w) for w in windows])
    ax.minorticks_off()
    ax.set_xlabel("cache window (thought tokens kept)")
    ax.set_ylabel("pass@1 (%)")
    ax.set_title(f"Accuracy vs cache budget: {title}")
    return save_plot(fig, ax, path)


# --------------------------------------------------------------------------- training


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _last(records: list[dict], key: str) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    return values[-1] if values else None


def _tail_mean(records: list[dict], key: str, frac: float = 0.1) -> float | None:
    values = [r[key] for r in records if r.get(key) is not None]
    if not values:
        return None
    n = max(1, math.ceil(len(values) * frac))
    return sum(values[-n:]) / n


def training_section(trains: list[TrainRun], out: Path) -> tuple[list[str], list[Path]]:
    """A table of training runs and the reward / loss curves."""
    labels = train_labels(trains)
    header = ["run", "method", "window", "dataset", "steps", "reward first", "reward final", "reward best",
              "loss final", "step peak mem GB", "s/step"]
    rows = []
    for label, t in zip(labels, trains, strict=True):
        cfg = t.config
        method = (cfg.get("adapter") or {}).get("mode", "-") if isinstance(cfg.get("adapter"), dict) else "-"
        window = (cfg.get("cache") or {}).get("window", "-") if isinstance(cfg.get("cache"), dict) else "-"
        dataset = (cfg.get("data") or {}).get("dataset", "-") if isinstance(cfg.get("data"), dict) else "-"
        rewards = [r["reward"] for r in t.records if r.get("reward") is not None]
        rows.append([
            label, method, "full" if window is None else window, dataset,
            _fmt(_last(t.records, "step")),
            _fmt(rewards[0] if rewards else None), _fmt(_tail_mean(t.records, "reward")),
            _fmt(max(rewards) if rewards else None), _fmt(_last(t.records, "loss"), 4),
            _fmt(max((r[PEAK_MEMORY] for r in t.records if r.get(PEAK_MEMORY) is not None), default=None), 2),
            _fmt(_tail_mean(t.records, "step_seconds", 1.0), 2),
        ])
    lines = ["Reward final = mean over the last 10% of steps.", "", markdown_table(header, rows), ""]
    plots = []
    for key, title in (("reward", "Reward"), ("loss", "Loss")):
        path = out / f"{key}.png"
        if plot_curves({lab: t.records for lab, t in zip(labels, trains, strict=True)}, key, path, title):
            lines += [f"![{key} curves]({path.name})", ""]
            plots.append(path)
    for label, t in zip(labels, trains, strict=True):
        path = out / f"diagnostics_{_slug(label)}.png"
        if plot_diagnostics(t.records, path, label):
            lines += [f"![diagnostics of {label}]({path.name})", ""]
            plots.append(path)
    return lines, plots


def _series(records: list[dict], prefix: str) -> dict[str, list[tuple[float, float]]]:
    """Every metric under `prefix` (e.g. "diag/grad_norm/") against the step, keyed by its last part."""
    out: dict[str, list[tuple[float, float]]] = {}
    for r in records:
        for key, value in r.items():
            if key.startswith(prefix) and isinstance(value, (int, float)):
                out.setdefault(key[len(prefix):], []).append((r["step"], value))
    return out


def plot_diagnostics(records: list[dict], path: Path, title: str) -> Path | None:
    """The training diagnostics of one run (None if it logged none): gradient norm and distance from
    init per parameter group, and per layer the state's RMS and the encoder's share of attention on
    its global tokens (one line per layer, dark to light from the first layer to the last)."""
    panels = [("diag/grad_norm/", "gradient norm (pre-clip)", True),
              ("diag/rel_change/", "|theta - theta_0| / |theta_0|", True),
              ("diag/state_rms/", "RMS of the state S, per layer", False),
              ("diag/global_share/", "attention share of global tokens, per layer", False)]
    data = [(_series(records, prefix), label, log) for prefix, label, log in panels]
    up = _series(records, "diag/update_norm/").get("adapter_up")
    if up:  # the up-projection starts at zero: its distance from init, not a ratio
        data[1][0]["adapter_up (|theta|)"] = up
    data = [d for d in data if d[0]]
    if not data:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(data), figsize=(4.2 * len(data), 3.6), squeeze=False)
    for ax, (series, label, log) in zip(axes[0], data, strict=True):
        per_layer = all(name.startswith("l") and name[1:].isdigit() for name in series)
        cmap = plt.get_cmap("viridis")
        for i, (name, points) in enumerate(sorted(series.items())):
            steps, values = zip(*points, strict=True)
            color = cmap(i / max(len(series) - 1, 1)) if per_layer else None
            ax.plot(steps, values, color=color, linewidth=1, label=None if per_layer else name)
        if log and any(v > 0 for points in series.values() for _, v in points):
            ax.set_yscale("log")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not per_layer:
            ax.legend(fontsize=7)
    fig.suptitle(f"{title}: diagnostics", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------- the report


def build_report(paths: list[str | Path], output_dir: str | Path) -> tuple[str, list[Path]]:
    """Write ``report.md`` and the PNG plots to ``output_dir``; returns the markdown and the plots."""
    evals, trains = discover(paths)
    out = output_directory(output_dir)
    lines = ["# thoughtfold report", ""]
    sources = [f"- `{e.path}`: eval of {e.summary.get('model') or '?'}"
               + (f" + adapter `{e.summary['adapter']}`" if e.summary.get("adapter") else "")
               + f" (method {label})" for label, e in zip(eval_labels(evals), evals, strict=True)]
    sources += [f"- `{t.path}`: training, {len(t.records)} logged steps" for t in trains]
    lines += ["Runs:", "", *sources, ""]
    plots: list[Path] = []
    if evals:
        settings = {json.dumps({k: e.summary.get("settings", {}).get(k) for k in
                                ("temperature", "top_p", "max_new_tokens", "evict_ratio")}) for e in evals}
        lines += ["## Accuracy under cache budgets", ""]
        if len(settings) > 1:
            lines += ["Note: the runs used different sampling settings (temperature / top-p / max new "
                      "tokens / evict ratio); see each summary.json.", ""]
        else:
            s = json.loads(next(iter(settings)))
            lines += [f"Sampling: temperature {s['temperature']}, top-p {s['top_p']}, max new tokens "
                      f"{s['max_new_tokens']}, evict ratio {s['evict_ratio']}.", ""]
        section, section_plots = accuracy_section(evals, out)
        lines += section
        plots += section_plots
    if trains:
        lines += ["## Training", ""]
        section, section_plots = training_section(trains, out)
        lines += section
        plots += section_plots
    text = "\n".join(lines).rstrip() + "\n"
    tmp = out / (REPORT_NAME + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out / REPORT_NAME)
    return text, plots
