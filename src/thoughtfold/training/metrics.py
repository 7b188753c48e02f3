"""The training metrics log: one JSON line per logged step in `metrics.jsonl` (the file `thoughtfold
report` reads back), mirrored to TensorBoard / W&B when asked, plus the peak-memory probe each step
records."""

from __future__ import annotations

import contextlib
import json
import resource
from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import ConfigError
from ..persist import atomic_write_text

METRICS_NAME = "metrics.jsonl"  # the trainer's metrics log, one JSON object per logged step


class MetricsLogger:
    """One JSON line per logged step in `metrics.jsonl` (always), plus TensorBoard / W&B when asked.
    On resume the lines after the checkpoint's step are dropped, so the log matches the state."""

    def __init__(self, output_dir: Path, report_to: Sequence[str], start_step: int, config: dict):
        self.path = output_dir / METRICS_NAME
        kept = [r for r in read_metrics(self.path) if r["step"] <= start_step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._file = self.path.open("a")
        self._tb = self._wandb = None
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir / "tensorboard"), purge_step=start_step + 1)
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                raise ConfigError("report_to wandb needs the wandb package: pip install wandb") from None
            self._wandb = wandb.init(project="thoughtfold", dir=str(output_dir), config=config,
                                     resume="allow")

    def log(self, metrics: dict[str, float]) -> None:
        """Append one logged step's metrics everywhere."""
        self._file.write(json.dumps(metrics) + "\n")
        self._file.flush()
        step = int(metrics["step"])
        if self._tb is not None:
            for key, value in metrics.items():
                if key != "step":
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(metrics, step=step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


LAST_VALUE = ("step", "epoch", "learning_rate")  # where a run is: the last step's value, not a mean
MAX_VALUE = ("peak_memory_gb",)


def mean_metrics(records: Sequence[dict[str, float]]) -> dict[str, float]:
    """One log line for the steps since the last one (`logging_steps`), as TRL logs: each metric's
    mean over those steps, the peak memory's maximum, and the last step's position and learning rate."""
    if len(records) == 1:
        return dict(records[0])
    out = dict(records[-1])
    for key in out:
        values = [r[key] for r in records if key in r]
        if key in MAX_VALUE:
            out[key] = max(values)
        elif key not in LAST_VALUE:
            out[key] = sum(values) / len(values)
    return out


def read_metrics(path: str | Path) -> list[dict]:
    """The step records of a metrics.jsonl (none if it does not exist yet); a line cut short by a
    kill, or anything that is not a step record, is skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


PEAK_RSS_RESET = Path("/proc/self/clear_refs")  # Linux: writing 5 resets the process's peak RSS


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: the accelerator's allocator statistics, or on Linux the process's peak RSS
    (elsewhere the CPU peak stays the process's since it started)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        PEAK_RSS_RESET.write_text("5")


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory since the last reset, or the process's peak RSS on CPU (since the last
    reset where Linux allows one)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")) / 2**20
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
