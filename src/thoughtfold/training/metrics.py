"""The training metrics log: one JSON line per logged step in `metrics.jsonl` (the file `thoughtfold
report` reads back), mirrored to TensorBoard / W&B when asked, plus the peak-memory probe each step
records (`peak_memory_gb`: the CUDA allocator's peak, or on CPU the resident set's high-water mark
within the step)."""

from __future__ import annotations

import json
import re
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
PEAK_MEMORY = "peak_memory_gb"  # the step's own peak memory in GiB (StepMemory)
PEAK_RSS_RESET = Path("/proc/self/clear_refs")  # Linux: writing 5 resets the process's peak RSS
MAX_VALUE = (PEAK_MEMORY,)


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


class StepMemory:
    """The peak memory of one training step, logged as `peak_memory_gb`: on CUDA the allocator's peak
    (weights included), on CPU the process's resident-set high-water mark, reset at the start of the
    step (Linux lets a process reset it; elsewhere, and where that is not allowed, nothing is
    reported rather than the process's lifetime peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._reset = False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            PEAK_RSS_RESET.write_text("5")
            self._reset = True
        except OSError:
            self._reset = False

    def metrics(self) -> dict[str, float]:
        if self.device.type == "cuda":
            return {PEAK_MEMORY: torch.cuda.max_memory_allocated(self.device) / 2**30}
        peak = _status_kib("VmHWM") if self._reset else None
        return {} if peak is None else {PEAK_MEMORY: peak / 2**20}


def _status_kib(field: str) -> int | None:
    """A memory field of /proc/self/status in KiB (None where there is no such file)."""
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(match.group(1)) if match else None
