"""What a training run shows while it runs and when it ends: a metrics line every `logging_steps`
steps, the progress bar's postfix (the step just taken), a few sample completions as a table and in
``completions.jsonl`` (`log_completions`, `num_completions_to_print` of them), and a closing block
with the headline numbers (first and final reward or loss, evictions, wall time, the largest
per-step peak memory)."""

from __future__ import annotations

import json
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..persist import atomic_write_text
from ..render import markdown_table
from .metrics import PEAK_MEMORY, MetricsLogger, read_metrics

COMPLETIONS_NAME = "completions.jsonl"  # log_completions: the sample completions of each logged step

# (metric, label, format) in the order a metrics line shows them
LINE: tuple[tuple[str, str, str], ...] = (
    ("reward", "reward", "{:.3f}"), ("reward_std", "std", "{:.3f}"), ("loss", "loss", "{:.4g}"),
    ("completions/mean_length", "length", "{:.1f}"), ("evictions_per_rollout", "evictions", "{:.2f}"),
    ("grad_norm", "grad", "{:.3g}"), ("learning_rate", "lr", "{:.2e}"),
    ("eval_reward", "eval reward", "{:.3f}"), ("eval_loss", "eval loss", "{:.4g}"),
    ("step_seconds", "s/step", "{:.1f}"),
)


def _mib(record: dict[str, float]) -> list[str]:
    """The step's peak memory for a metrics line, in MiB."""
    return [f"peak memory {record[PEAK_MEMORY] * 1024:.1f} MiB"] if PEAK_MEMORY in record else []


class RunView:
    """What a run writes as it goes: on the main process metrics.jsonl (and TensorBoard / W&B),
    completions.jsonl, the progress bar, a metrics line per logged step and the closing block."""

    def __init__(self, trainer: Any):
        c, main, out = trainer.config, trainer.dp.main, trainer.output_dir
        self.max_steps, self.key, self.limit = c.max_steps, trainer.plot_key, c.num_completions_to_print
        self.logger = MetricsLogger(out, c.report_to, trainer.step, asdict(c)) if main else None
        self.completions = CompletionsLog(out, trainer.step) if main and c.log_completions else None
        self.bar = tqdm(total=c.max_steps, initial=trainer.step, disable=not (c.progress and main),
                        desc=trainer.kind, unit="step", dynamic_ncols=True)
        self.started = time.perf_counter()

    def stepped(self, record: dict[str, float]) -> None:
        """A step was taken: the bar moves on and shows that step's numbers."""
        self.bar.set_postfix(postfix(record, self.key), refresh=False)
        self.bar.update(1)

    def log(self, metrics: dict[str, float], completions: Sequence[dict[str, Any]]) -> None:
        """A logged step: its metrics everywhere, a line on stderr, and the sample completions."""
        if self.logger is None:
            return
        self.logger.log(metrics)
        tqdm.write(metrics_line(metrics, self.max_steps), file=sys.stderr)
        if self.completions is not None and completions:
            shown = completions if self.limit is None else completions[: self.limit]
            self.completions.write(int(metrics["step"]), shown)
            tqdm.write(completions_table(shown), file=sys.stderr)

    def close(self) -> None:
        self.bar.close()
        if self.logger is not None:
            self.logger.close()

    def finish(self, kind: str, records: Sequence[dict[str, float]]) -> None:
        """The closing block, on the main process."""
        if self.logger is not None:
            print("\n".join(closing_block(kind, records, time.perf_counter() - self.started, self.key)),
                  file=sys.stderr)


def metrics_line(record: dict[str, float], max_steps: int) -> str:
    """One logged step as a line: `step 4/16 | reward 0.625 | std 0.41 | ...`."""
    parts = [f"step {int(record['step'])}/{max_steps}"]
    parts += [f"{label} {fmt.format(record[key])}" for key, label, fmt in LINE if key in record]
    return " | ".join(parts + _mib(record))


def postfix(record: dict[str, float], key: str) -> dict[str, str]:
    """The progress bar's postfix: the step's headline metric (reward or loss) and its token rate."""
    out = {key: f"{record[key]:.4g}"} if key in record else {}
    if "rollout_tokens_per_s" in record:
        out["tok/s"] = f"{record['rollout_tokens_per_s']:.0f}"
    return out


def completions_table(rows: Sequence[dict[str, Any]], width: int = 48) -> str:
    """Completions as a table: prompt, completion, reward, advantage; long texts are shortened, line
    breaks shown as spaces."""

    def cell(text: Any) -> str:
        return textwrap.shorten(" ".join(str(text).split()), width, placeholder=" ...") or "''"

    cells = [[cell(r["prompt"]), cell(r["completion"]), f"{r['reward']:.3f}", f"{r['advantage']:+.3f}"]
             for r in rows]
    return markdown_table(["prompt", "completion", "reward", "advantage"], cells)


class CompletionsLog:
    """`completions.jsonl` in the output directory: one JSON line per sample completion of each logged step.
    On resume the lines after the checkpoint's step are dropped, as the metrics log's are."""

    def __init__(self, output_dir: Path, start_step: int):
        self.path = output_dir / COMPLETIONS_NAME
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, step: int, rows: Sequence[dict[str, Any]]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps({"step": step, **r}, ensure_ascii=False) + "\n" for r in rows))


def closing_block(kind: str, records: Sequence[dict[str, float]], seconds: float, key: str) -> list[str]:
    """The headline numbers of a finished run, from its logged records: the first and final value of
    `key` (reward or loss), of the completions' length and evictions, the last evaluation, the wall
    time and the largest per-step peak memory."""
    minutes, secs = divmod(round(seconds), 60)
    lines = [f"thoughtfold: {kind} finished at step {int(records[-1]['step']) if records else 0} "
             f"in {minutes} min {secs} s"]
    for name, label in ((key, key), ("completions/mean_length", "length"),
                        ("evictions_per_rollout", "evictions/rollout"), ("eval_reward", "eval reward"),
                        ("eval_loss", "eval loss")):
        values = [r[name] for r in records if name in r]
        if values:
            lines.append(f"  {label + ':':20s}{values[0]:.3f} (first logged step) -> {values[-1]:.3f} (last)")
    memory = [r[PEAK_MEMORY] for r in records if PEAK_MEMORY in r]
    if memory:
        lines.append(f"  {'peak memory:':20s}{max(memory) * 1024:.1f} MiB (largest step)")
    return lines
