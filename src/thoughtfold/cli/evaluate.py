"""`thoughtfold eval`: sample K completions per problem under each cache window, grade them with
math-verify and report pass@1 / pass@k per dataset and window. Writes samples.jsonl and summary.json to
--output; rerunning the same command resumes an interrupted evaluation."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from ..tasks.example import SYSTEM_PROMPT
from . import flags

NAME = "eval"
HELP = "pass@k accuracy per dataset and cache window"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", "--data", dest="datasets", required=True, metavar="NAME|PATH[,...]",
                   help="comma-separated: bundled sets (gsm8k, math500, minerva), Hub ids/aliases "
                   "(aime24, aime25, amc23, olympiadbench), .jsonl files, arith[:options]")
    flags.add_model_flags(p, adapter_help="a trained thoughtfold adapter")
    flags.add_cache_flags(p, window_list=True)
    flags.add_sampling_flags(p, max_new_tokens=1024, temperature=0.6, top_p=0.95, seed=0)
    flags.add_prompt_flags(p, SYSTEM_PROMPT, "system message [default: ask for step-by-step reasoning and a "
                     "\\boxed{} answer]")
    p.add_argument("--no-system-prompt", action="store_true", help="send no system message")
    p.add_argument("--n-samples", type=flags.number(int, "n-samples"), default=1, metavar="K",
                   help="samples per problem [default: %(default)s]")
    p.add_argument("--limit", type=flags.number(int, "limit"), default=None, metavar="N",
                   help="first N problems of each dataset")
    p.add_argument("--split", default=None, help="dataset split [default: the set's test split]")
    p.add_argument("--reward", default="math", help="grader: math (math-verify), arith, or a reward "
                   "function 'pkg.module:function' [default: %(default)s]")
    p.add_argument("--reward-timeout", type=flags.number(float, "reward-timeout"), default=300.0,
                   metavar="S", help="seconds one grading call may take [default: %(default)s]")
    p.add_argument("--name", default=None, help="method name in summaries and reports "
                   "[default: the adapter mode, or 'base']")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="output directory [default: runs/eval/<run>-<settings>: the training run (or model) "
                   "and a digest of these settings and the adapter's weights, so that other settings never "
                   "collide and the same command resumes]")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def split_dataset_list(value: str) -> list[str]:
    """`gsm8k,arith:steps=2,digits=2,recall` -> ["gsm8k", "arith:steps=2,digits=2", "recall"]: a
    comma-separated item that is a bare `key=value` continues the options of the spec before it."""
    specs: list[str] = []
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        if specs and "=" in part and ":" not in part and ":" in specs[-1]:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


def run_name(adapter: str | None, model: str | None) -> str:
    """What an evaluation is named after: the training run an adapter comes from (`runs/x/adapter`
    -> x, `runs/x/checkpoints/step-00000008/adapter` -> x-step-00000008), else the adapter's or the
    model's own name."""
    if adapter is None:
        return Path(model or "default").name
    path = Path(adapter).resolve()
    if path.name != "adapter":
        return path.name
    if path.parent.parent.name == "checkpoints":
        return f"{path.parent.parent.parent.name}-{path.parent.name}"
    return path.parent.name


def default_output(adapter: str | None, model: str | None, settings: dict) -> Path:
    """runs/eval/<run>-<digest of the settings, the model and the adapter's weights>."""
    from ..persist import weights_digest

    identity = {"settings": settings, "model": model, "weights": weights_digest(adapter) if adapter else None}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return Path("runs") / "eval" / f"{run_name(adapter, model)}-{digest}"


def run(args: argparse.Namespace) -> int:
    """Settings first (an unknown reward or a bad window fails before the model loads), then the
    output directory's lock, the model and the evaluation."""
    from ..evaluation.evaluate import SAMPLES_NAME, SUMMARY_NAME, EvalConfig, evaluate, summary_table
    from ..persist import lock_directory

    windows = getattr(args, "window", None)
    bounded = next((w for w in windows or [] if w is not None), None)  # where the eviction settings apply
    cache = flags.cache_config(args, "evict_ratio", "eviction", **({"window": bounded} if bounded else {}))
    config = EvalConfig(
        datasets=split_dataset_list(args.datasets), windows=list(dict.fromkeys(windows or [cache.window])),
        cache=cache, sampling=flags.sampling_config(args), n_samples=args.n_samples, limit=args.limit,
        batch_size=args.batch_size, slots=args.slots, split=args.split,
        system_prompt=None if args.no_system_prompt else args.system_prompt,
        chat_template=not args.no_chat_template, reward=args.reward, reward_timeout=args.reward_timeout,
        method=args.name, output_dir=args.output or "", progress=not args.no_progress,
    )
    if not args.output:
        config.output_dir = str(default_output(args.adapter, args.model, config.settings()))
    with lock_directory(config.output_dir, "evaluation"):  # also: a read-only --output fails here, not later
        policy = flags.load_policy(args)
        summary = evaluate(policy, config, model=policy.base_model,
                           adapter=str(Path(args.adapter).resolve()) if args.adapter else None)
    s = config.sampling
    print(f"method: {summary['method']}  model: {summary['model']}  samples/problem: {config.n_samples}  "
          f"T={s.temperature} top-p={s.top_p} max-new-tokens={s.max_new_tokens}")
    print(summary_table(summary))
    out = Path(config.output_dir)
    print(f"thoughtfold: wrote {out / SAMPLES_NAME} and {out / SUMMARY_NAME}", file=sys.stderr)
    return 0
