"""Run the benchmarks a `BenchConfig` names: print each table, and with an output directory write
`bench.md` (the tables), `bench.json` (the settings and every table's numbers, for scripts) and a
plot per sweep (`decode.png`, `replay.png`, `grpo.png`, `eviction.png`, `rollout.png`).

Random-init models of a chosen shape, so nothing is downloaded. On a CPU, time and memory are
measured in separate passes: the memory tracker slows every op, so it never runs while timing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ...errors import ConfigError
from ...persist import output_directory
from .config import BenchConfig
from .decode import decode_benchmark
from .encoder import encoder_benchmark
from .measure import describe_device
from .rollout import rollout_benchmark
from .table import Table
from .training import eviction_benchmark, grpo_benchmark, replay_benchmark

BENCHMARK_RUNS: dict[str, Callable[[BenchConfig], Table]] = {
    "decode": decode_benchmark, "replay": replay_benchmark, "grpo": grpo_benchmark,
    "encoder": encoder_benchmark, "eviction": eviction_benchmark, "rollout": rollout_benchmark,
}


@dataclass
class BenchResult:
    """The tables of a run by benchmark, the plots it wrote and its markdown page."""

    tables: dict[str, Table]
    plots: list[Path]
    markdown: str


def run_benchmarks(config: BenchConfig) -> BenchResult:
    """Run the configured benchmarks one after the other, printing each table as it is done."""
    if config.cuda and not torch.cuda.is_available():
        raise ConfigError(f"device {config.device} requested but CUDA is not available")
    out = output_directory(config.output_dir) if config.output_dir is not None else None  # before any work
    torch.set_grad_enabled(True)
    settings = {**config.settings(), "device": describe_device(config.device)}
    header = " ".join(f"{k}={v}" for k, v in settings.items())
    print(header)
    tables: dict[str, Table] = {}
    plots: list[Path] = []
    for name in config.benchmarks:
        table = tables[name] = BENCHMARK_RUNS[name](config)
        print(f"\n{table.title}\n{table.markdown()}", flush=True)
        if out is not None and table.plot:
            what = table.title.split(":")[0]
            title = f"{what}, batch {config.batch}, W={config.window} ({config.shape}, {config.device})"
            plots.append(table.draw(out / f"{name}.png", title))
    sections = ["# thoughtfold bench", "", header, ""]
    for table in tables.values():
        sections += [f"### {table.title}", "", table.markdown(), ""]
    markdown = "\n".join(sections + [f"![{p.stem}]({p.name})" for p in plots]).rstrip() + "\n"
    if out is not None:
        (out / "bench.md").write_text(markdown)
        record = {"settings": settings, "tables": {name: t.to_dict() for name, t in tables.items()}}
        (out / "bench.json").write_text(json.dumps(record, indent=1) + "\n")
    return BenchResult(tables, plots, markdown)
