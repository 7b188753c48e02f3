"""`thoughtfold grpo` (alias `train`) and `thoughtfold sft`, as TRL names its `trl grpo` / `trl sft`
commands: a run from a YAML config plus KEY=VALUE overrides, then where its results are and the
`thoughtfold eval` command that evaluates them."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from ..config import TrainConfig, load_config

TRAINERS = (
    ("grpo", ["train"],
     "RL-train with cache-aware GRPO; no arguments = the quickstart run on the bundled model"),
    ("sft", [], "supervised training through the replay (imitate dataset solutions or full-cache traces)"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML config (see configs/); default: the built-in quickstart settings")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint in output_dir")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides, e.g. cache.window=64 adapter.mode=lora max_steps=50")


def run(args: argparse.Namespace) -> int:
    """Train, then say (on the main process) where the results are and how to evaluate them."""
    from .. import GRPOTrainer, SFTTrainer

    config = load_config(args.config, [*args.overrides, *(["resume=true"] if args.resume else [])])
    trainer = (GRPOTrainer if args.trainer == "grpo" else SFTTrainer)(args=config)
    paths = trainer.train()
    if trainer.dp.main:
        plot = paths["plot"] if paths["plot"] is not None else "(no data)"
        print("\n".join([
            f"thoughtfold: {trainer.kind} finished after {trainer.step} steps",
            f"  adapter:  {paths['adapter']}",
            f"  logs:     {paths['metrics']}",
            f"  plot:     {plot}",
            f"  evaluate: {eval_command(config, paths['adapter'])}",
        ]), file=sys.stderr)
    return 0


def eval_command(config: TrainConfig, adapter: Path) -> str:
    """`thoughtfold eval` of the trained task with the training prompts, grader (the first reward;
    eval's default grader when there is none, as for SFT) and token budget (the window comes from the
    adapter's saved cache settings)."""
    from ..tasks.example import SYSTEM_PROMPT

    data = config.data
    args = ["thoughtfold", "eval", "--adapter", str(adapter), "--data", data.dataset,
            *(["--reward", config.rewards[0]] if config.rewards else []),
            "--max-new-tokens", str(config.max_completion_length)]
    if data.system_prompt is None:
        args.append("--no-system-prompt")
    elif data.system_prompt != SYSTEM_PROMPT:
        args += ["--system-prompt", data.system_prompt]
    if not data.chat_template:
        args.append("--no-chat-template")
    return shlex.join(args)
