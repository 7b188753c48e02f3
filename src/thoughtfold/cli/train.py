"""`thoughtfold grpo` (alias `train`) and `thoughtfold sft`, as TRL names its `trl grpo` / `trl sft`
commands: a run from a YAML config plus overrides (KEY=VALUE, or TRL's `--key value` flags), then
where its results are and the `thoughtfold eval` command that evaluates them on held-out problems
at the trained window and with a full cache. `--help` lists every setting with its default."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from ..config import GRPOConfig, SFTConfig, TrainConfig
from ..config_files import config_to_yaml, load_config
from ..settings_help import SETTINGS_HELP, default_settings, shown_value
from . import flags

TRAINERS = (
    ("grpo", ["train"],
     "RL-train with cache-aware GRPO; no arguments = the quickstart run on the bundled model"),
    ("sft", [], "supervised training through the replay (imitate dataset solutions or full-cache traces)"),
)
COMMANDS = {"grpo", "train", "sft"}
OWN_FLAGS = {"--config", "--resume", "--print-config", "--evaluate", "-h", "--help"}
PROCEDURAL = ("arith", "recall")  # datasets with a held-out "test" split of their own


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, metavar="FILE",
                   help="YAML config (see configs/); default: the built-in quickstart settings")
    p.add_argument("--resume", action="store_true",
                   help="continue from the last complete checkpoint in output_dir")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved settings as YAML (a config file) and exit without training")
    p.add_argument("--evaluate", action="store_true",
                   help="after training, run the printed `thoughtfold eval` command")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="settings, e.g. cache.window=64 adapter.mode=lora max_steps=50; TRL's "
                   "`--learning_rate 1e-5` form works too, and TRL's names translate")
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = settings_epilog()


def settings_epilog() -> str:
    """Every setting with its default and one line of help (settings_help.py), for --help."""
    lines = ["settings (KEY=VALUE or --KEY VALUE; default shown):"]
    for name, value in default_settings(TrainConfig()).items():
        lines.append(f"  {f'{name}={shown_value(value)}':38s} {SETTINGS_HELP[name]}")
    lines.append("TRL's GRPOConfig / SFTConfig names (per_device_train_batch_size, bf16, ...) are translated "
                 "or refused with what to use: docs/coming-from-trl.md")
    return "\n".join(lines)


def flags_as_overrides(argv: Sequence[str]) -> list[str]:
    """A training command's arguments with TRL-style flags (`--learning_rate 1e-5`,
    `--gradient-checkpointing`, `--report_to=none`) turned into KEY=VALUE overrides; a flag with no
    value is `true`. The command's own flags (--config, --resume, ...) are left as they are."""
    out, rest = [], list(argv)
    while rest:
        token = rest.pop(0)
        key, eq, value = token[2:].partition("=")
        if not token.startswith("--") or token.partition("=")[0] in OWN_FLAGS or not key:
            out.append(token)
            continue
        if not eq:
            value = rest.pop(0) if rest and not rest[0].startswith("--") and "=" not in rest[0] else "true"
        out.append(f"{key.replace('-', '_')}={value}")
    return out


def run(args: argparse.Namespace) -> int:
    """Train, then say (on the main process) where the results are and how to evaluate them."""
    from .. import GRPOTrainer, SFTTrainer

    config_class = GRPOConfig if args.trainer == "grpo" else SFTConfig
    overrides = [*args.overrides, *(["resume=true"] if args.resume else [])]
    config = load_config(args.config, overrides, config_class)
    if args.print_config:
        print(config_to_yaml(config), end="")
        return 0
    flags.quiet_transformers()
    trainer = (GRPOTrainer if args.trainer == "grpo" else SFTTrainer)(args=config)
    paths = trainer.train()
    if not trainer.dp.main:
        return 0
    command = eval_command(trainer.config, paths["adapter"])
    plot = paths["plot"] if paths["plot"] is not None else "(no data)"
    print("\n".join([f"  adapter:  {paths['adapter']}", f"  logs:     {paths['metrics']}",
                     f"  plot:     {plot}", f"  evaluate: {command}"]), file=sys.stderr)
    if args.evaluate:
        from . import main

        print(f"thoughtfold: {command}", file=sys.stderr)
        return main(shlex.split(command)[1:])
    return 0


def eval_command(config: TrainConfig, adapter: Path) -> str:
    """`thoughtfold eval` of the trained task with the training prompts, grader (the first reward;
    eval's default grader when there is none, as for SFT) and token budget, on the held-out split of
    a procedural task, at the trained window and with a full cache."""
    from ..tasks.example import SYSTEM_PROMPT

    data = config.data
    window = config.cache.window
    args = ["thoughtfold", "eval", "--adapter", str(adapter), "--data", data.dataset,
            *(["--reward", config.rewards[0]] if config.rewards else []),
            "--max-new-tokens", str(config.max_completion_length),
            "--window", "none" if window is None else f"{window},none"]
    if data.dataset.split(":")[0] in PROCEDURAL:  # their own held-out split, 64 problems of it
        args += ["--split", "test", "--limit", "64"]
    if data.system_prompt is None:
        args.append("--no-system-prompt")
    elif data.system_prompt != SYSTEM_PROMPT:
        args += ["--system-prompt", data.system_prompt]
    if not data.chat_template:
        args.append("--no-chat-template")
    return shlex.join(args)
