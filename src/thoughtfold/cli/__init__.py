"""The `thoughtfold` command. Subcommands: `generate` (bounded-cache generation), `train` (GRPO),
`sft` (supervised), `eval` (accuracy under cache budgets), `report` (tables and plots of runs) and
`bench` (memory and speed tables).

Every `ThoughtfoldError` (and every bad command-line value) ends the command with one line
`error: <message>` on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

from .. import __version__
from ..config import EVICTIONS
from ..errors import ConfigError, DataError, ThoughtfoldError

if TYPE_CHECKING:
    from ..config import TrainConfig

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: <message>` (no usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(f"{message} (see: {self.prog} --help)")


class _UsageError(Exception):
    pass


# --------------------------------------------------------------------------- argument types


def window_arg(value: str) -> int | None:
    """`--window`: an integer, or 'none'/'full' for a full cache. Range checks are CacheConfig's."""
    if value.strip().lower() in ("none", "full"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"window must be an integer >= 1 or 'none' (full cache), got {value!r}"
        ) from None


def _number(kind: type, what: str):
    def parse(value: str):
        try:
            return kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {value!r}") from None

    parse.__name__ = what
    return parse


COMPILE_HELP = ("run the decode step through torch.compile (on CUDA its fused kernels are then captured "
                "as a CUDA graph: ~1.5x faster decoding, after a compilation of a minute or two)")


# --------------------------------------------------------------------------- prompts file


def read_prompts_file(path: str | Path) -> list[str | list[int]]:
    """Prompts from a JSONL file ('-' = stdin): each non-blank line is a JSON object with a
    "prompt" field (a string, or a list of token ids) or a bare JSON string. A malformed line raises
    DataError naming the file and the line number."""
    name = str(path)
    try:
        if name == "-":
            name = "<stdin>"
            lines = sys.stdin.read().splitlines()
        else:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"prompts file {name} not found") from None
    except IsADirectoryError:
        raise DataError(f"prompts file {name} is a directory, not a JSONL file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"prompts file {name} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"prompts file {name} cannot be read: {e.strerror or e}") from None
    prompts: list[str | list[int]] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{name} line {lineno}"
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply") from None
        if isinstance(item, dict):
            if "prompt" not in item:
                keys = ", ".join(map(str, item)) or "none"
                raise DataError(f'{where}: no "prompt" field (keys found: {keys})')
            item = item["prompt"]
            if isinstance(item, list):
                if not item or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in item):
                    raise DataError(f'{where}: a token-id "prompt" must be a non-empty list of integers >= 0')
            elif not isinstance(item, str):
                raise DataError(f'{where}: "prompt" must be a string, got {_json_type(item)}')
        elif not isinstance(item, str):
            raise DataError(
                f'{where}: expected a JSON object with a "prompt" field or a JSON string, got {_json_type(item)}'
            )
        if isinstance(item, str) and not item.strip():
            raise DataError(f"{where}: the prompt is empty")
        prompts.append(item)
    if not prompts:
        raise DataError(f"prompts file {name} has no prompts")
    return prompts


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


# --------------------------------------------------------------------------- streaming


class TerminalStreamer:
    """Prints one sequence's text as it is generated (a transformers-style streamer: `put` gets the
    new token ids, `end` finishes). Text is printed up to word boundaries, incomplete UTF-8 is held
    back, and nothing is printed after an EOS token or past the first stop string -- what ends up on
    the terminal is the text `generate` returns."""

    def __init__(self, tokenizer, eos_ids: set[int], stop: Sequence[str] = (), out: IO[str] | None = None):
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.stop = [s for s in stop if s]
        self.out = out if out is not None else sys.stdout
        self._keep = max((len(s) for s in self.stop), default=1)
        self._ids: list[int] = []
        self._printed = 0  # characters of decode(self._ids) already written
        self._tail = ""  # last characters written before self._ids started (for stops across lines)
        self._finished = False

    def put(self, value) -> None:
        """Take the next token id(s) of a batch of one."""
        if self._finished:
            return
        ids = value.reshape(-1).tolist() if hasattr(value, "reshape") else list(value)
        for tid in ids:
            if tid in self.eos_ids:
                self._finish()
                return
            self._ids.append(int(tid))
            text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
            if self.stop and any(s in self._tail + text for s in self.stop):
                self._finish()  # writes the rest of `text`
                return
            if text.endswith("\n"):
                self._write(text[self._printed :])
                self._tail = (self._tail + text)[-self._keep :]
                self._ids, self._printed = [], 0
            elif not text.endswith("\ufffd"):
                cut = text.rfind(" ") + 1
                if cut > self._printed:
                    self._write(text[self._printed : cut])
                    self._printed = cut

    def end(self) -> None:
        """Flush what is left and end the line."""
        self._finish()

    def _finish(self) -> None:
        if self._finished:
            return
        self._finished = True
        if self._ids:
            text = self.tokenizer.decode(self._ids, skip_special_tokens=True)
            self._write(text[self._printed :])
        self._write("\n")

    def _write(self, text: str) -> None:
        if text:
            self.out.write(text)
            self.out.flush()


# --------------------------------------------------------------------------- generate


def add_generate_parser(sub: argparse._SubParsersAction) -> None:
    """Register `thoughtfold generate`."""
    p = sub.add_parser(
        "generate",
        help="generate text under a bounded KV cache",
        description="Generate completions with a bounded KV cache: the prompt is pinned and at most "
        "WINDOW generated tokens are kept; when the window is full the oldest ceil(R*WINDOW) are evicted.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument(
        "--prompts-file", metavar="F.jsonl",
        help='JSONL file, one prompt per line: {"prompt": "..."} or a JSON string ("-" = stdin)',
    )
    p.add_argument("--model", default=None, help="hub id, local directory, or 'default' "
                   "(bundled SmolLM2-135M-Instruct) [default: the adapter's base model, else default]")
    # no argparse defaults for the cache: unset means "the adapter's saved setting" with --adapter
    p.add_argument("--window", type=window_arg, default=argparse.SUPPRESS, metavar="W",
                   help="thought tokens kept in the cache, or 'none' for a full cache "
                   "[default: the adapter's, else none]")
    p.add_argument("--evict-ratio", type=_number(float, "evict-ratio"), default=argparse.SUPPRESS,
                   metavar="R", help="fraction of the window evicted at once, in (0, 1] "
                   "[default: the adapter's, else 0.25]")
    p.add_argument("--eviction", choices=EVICTIONS, default=argparse.SUPPRESS,
                   help="which tokens an eviction removes: the oldest block, or per sequence and layer by "
                   "attention received (h2o, snapkv, headkv) [default: the adapter's, else oldest]")
    p.add_argument("--max-new-tokens", type=_number(int, "max-new-tokens"), default=256, metavar="N",
                   help="[default: %(default)s]")
    p.add_argument("--temperature", type=_number(float, "temperature"), default=0.0, metavar="T",
                   help="sampling temperature; 0 = greedy [default: %(default)s]")
    p.add_argument("--top-p", type=_number(float, "top-p"), default=1.0, help="[default: %(default)s]")
    p.add_argument("--top-k", type=_number(int, "top-k"), default=0, help="0 = off [default: %(default)s]")
    p.add_argument("--seed", type=_number(int, "seed"), default=None, metavar="S", help="sampling seed")
    p.add_argument("--no-chat-template", action="store_true", help="encode prompts as plain text")
    p.add_argument("--system-prompt", default=None, help="system message (with the chat template)")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when the text contains STR (repeatable)")
    p.add_argument("--batch-size", type=_number(int, "batch-size"), default=16,
                   help="prompts decoded together [default: %(default)s]")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto "
                   "[default: float32 on CPU, bfloat16 on CUDA]")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N [default: cuda if available]")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--adapter", default=None, metavar="DIR",
                   help="load a trained thoughtfold adapter (with its base model and cache settings "
                   "unless --model / --window / --evict-ratio are given)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt: text, completion_ids, logprobs, evictions, "
                   "peak_cache_tokens")
    p.set_defaults(func=cmd_generate)


def load_policy(args: argparse.Namespace, cache=None):
    """The Policy for `generate` / `eval`: --model, else the adapter's base model, else the bundled
    default (Policy.from_pretrained decides); transformers' own progress bars and warnings silenced."""
    from transformers.utils import logging as hf_logging

    from ..policy import Policy

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    return Policy.from_pretrained(model=args.model, cache=cache, adapter_path=args.adapter, dtype=args.dtype,
                                  device=args.device, compile_decode=args.compile)


def resolve_cache(adapter: str | None, **given):
    """The CacheConfig from the cache flags that were given (`given`, e.g. window=64; a flag left
    out is not in it). With an --adapter the others are its saved settings
    (persist.adapter_settings), else CacheConfig's defaults (a full cache)."""
    from ..config import CacheConfig
    from ..persist import adapter_settings

    if adapter is not None:
        return adapter_settings(adapter, **given)[1]
    return CacheConfig(**given)


def cmd_generate(args: argparse.Namespace) -> int:
    """Run `thoughtfold generate`."""
    from ..config import SamplingConfig

    # settings first (cheap), so bad values fail before the model loads
    given = {k: getattr(args, k) for k in ("window", "evict_ratio", "eviction") if hasattr(args, k)}
    cache = resolve_cache(args.adapter, **given)
    if args.batch_size < 1:
        raise ConfigError(f"batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens < 1:
        raise ConfigError(f"max-new-tokens must be >= 1, got {args.max_new_tokens}")
    SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)  # range checks
    prompts = [args.prompt] if args.prompt is not None else read_prompts_file(args.prompts_file)
    if args.prompt is not None and not args.prompt.strip():
        raise DataError("the prompt is empty")

    policy = load_policy(args, cache=cache)

    stream = len(prompts) == 1 and not args.json
    totals = {"tokens": 0, "seconds": 0.0, "evictions": 0, "peak": 0}
    n_done = 0
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        streamer = TerminalStreamer(policy.tokenizer, policy.eos_token_ids, args.stop) \
            if stream else None
        seed = None if args.seed is None else args.seed + start
        res = policy.generate(
            batch, max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, seed=seed, chat_template=not args.no_chat_template, stop=args.stop or None,
            streamer=streamer, system_prompt=args.system_prompt,
        )
        for i in range(len(batch)):
            if args.json:
                record = {
                    "text": res.texts[i],
                    "completion_ids": res.completion_ids[i],
                    "logprobs": res.logprobs[i],
                    "evictions": res.evictions[i],
                    "peak_cache_tokens": res.peak_cache_tokens[i],
                }
                print(json.dumps(record, ensure_ascii=False), flush=True)
            elif not stream:
                print(f"=== [{n_done + i + 1}/{len(prompts)}] ===")
                print(res.texts[i], flush=True)
        n_done += len(batch)
        stats = res.stats
        totals["tokens"] += int(stats.get("generated_tokens", sum(len(c) for c in res.completion_ids)))
        totals["seconds"] += float(stats.get("seconds", 0.0))
        totals["evictions"] += int(stats.get("evictions", 0))
        totals["peak"] = max(totals["peak"], int(stats.get("peak_cache_tokens", 0)))

    rate = totals["tokens"] / totals["seconds"] if totals["seconds"] > 0 else 0.0
    window = "full cache" if cache.window is None else f"window {cache.window}, evict {cache.evict_block}"
    print(
        f"thoughtfold: {n_done} prompt(s), {totals['tokens']} tokens in {totals['seconds']:.2f} s "
        f"({rate:.1f} tokens/s); {totals['evictions']} eviction event(s); "
        f"peak cache {totals['peak']} tokens ({window})",
        file=sys.stderr,
    )
    return 0


# --------------------------------------------------------------------------- eval


def windows_arg(value: str) -> list[int | None]:
    """`eval --window`: comma-separated integers and/or 'none' (full cache)."""
    parts = [p for p in value.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("window list is empty: give e.g. 256,512,none")
    return [window_arg(p) for p in parts]


def add_eval_parser(sub: argparse._SubParsersAction) -> None:
    """Register `thoughtfold eval`."""
    from ..tasks.example import SYSTEM_PROMPT

    p = sub.add_parser(
        "eval", help="pass@k accuracy per dataset and cache window",
        description="Sample K completions per problem under each cache window, grade them with "
        "math-verify and report pass@1 / pass@k per dataset and window. Writes samples.jsonl and "
        "summary.json to --output; rerunning the same command resumes an interrupted evaluation.",
    )
    p.add_argument("--model", default=None, help="hub id, local directory, or 'default' "
                   "[default: the adapter's base model, else default]")
    p.add_argument("--adapter", default=None, metavar="DIR", help="a trained thoughtfold adapter")
    p.add_argument("--dataset", "--data", dest="datasets", required=True, metavar="NAME|PATH[,...]",
                   help="comma-separated: bundled sets (gsm8k, math500, minerva), Hub ids/aliases "
                   "(aime24, aime25, amc23, olympiadbench), .jsonl files, arith[:options]")
    p.add_argument("--window", type=windows_arg, default=None, metavar="W1,W2,...|none",
                   help="cache windows to evaluate under ('none' = full cache) "
                   "[default: the adapter's window, else none]")
    p.add_argument("--evict-ratio", type=_number(float, "evict-ratio"), default=None, metavar="R",
                   help="fraction of the window evicted at once [default: the adapter's, else 0.25]")
    p.add_argument("--eviction", choices=EVICTIONS, default=None,
                   help="which tokens an eviction removes [default: the adapter's, else oldest]")
    p.add_argument("--n-samples", type=_number(int, "n-samples"), default=1, metavar="K",
                   help="samples per problem [default: %(default)s]")
    p.add_argument("--temperature", type=_number(float, "temperature"), default=0.6,
                   help="[default: %(default)s]")
    p.add_argument("--top-p", type=_number(float, "top-p"), default=0.95, help="[default: %(default)s]")
    p.add_argument("--top-k", type=_number(int, "top-k"), default=0, help="0 = off [default: %(default)s]")
    p.add_argument("--max-new-tokens", type=_number(int, "max-new-tokens"), default=1024, metavar="N",
                   help="[default: %(default)s]")
    p.add_argument("--limit", type=_number(int, "limit"), default=None, metavar="N",
                   help="first N problems of each dataset")
    p.add_argument("--split", default=None, help="dataset split [default: the set's test split]")
    p.add_argument("--batch-size", type=_number(int, "batch-size"), default=16, metavar="B",
                   help="sequences decoded together [default: %(default)s]")
    p.add_argument("--seed", type=_number(int, "seed"), default=0, help="[default: %(default)s]")
    p.add_argument("--reward", default="math", help="grader: math (math-verify), arith, or a reward "
                   "function 'pkg.module:function' [default: %(default)s]")
    p.add_argument("--system-prompt", default=SYSTEM_PROMPT, help="system message [default: ask for "
                   "step-by-step reasoning and a \\boxed{} answer]")
    p.add_argument("--no-system-prompt", action="store_true", help="send no system message")
    p.add_argument("--no-chat-template", action="store_true", help="encode prompts as plain text")
    p.add_argument("--name", default=None, help="method name in summaries and reports "
                   "[default: the adapter mode, or 'base']")
    p.add_argument("--output", default=None, metavar="DIR",
                   help="output directory [default: runs/eval/<adapter or model name>]")
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N [default: cuda if available]")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_eval)


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


def cmd_eval(args: argparse.Namespace) -> int:
    """Run `thoughtfold eval`."""
    from ..config import SamplingConfig
    from ..evaluation.evaluate import EvalConfig, evaluate, summary_table
    from ..persist import lock_directory

    given = {k: v for k, v in (("evict_ratio", args.evict_ratio), ("eviction", args.eviction)) if v is not None}
    cache = resolve_cache(args.adapter, **given)
    name = Path(args.adapter).resolve().name if args.adapter else Path(args.model or "default").name
    config = EvalConfig(
        datasets=split_dataset_list(args.datasets),
        windows=list(dict.fromkeys(args.window if args.window is not None else [cache.window])),
        cache=cache, sampling=SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed),
        n_samples=args.n_samples, limit=args.limit, batch_size=args.batch_size, split=args.split,
        system_prompt=None if args.no_system_prompt else args.system_prompt,
        chat_template=not args.no_chat_template, reward=args.reward, method=args.name,
        output_dir=args.output or str(Path("runs") / "eval" / name), progress=not args.no_progress,
    )

    with lock_directory(config.output_dir, "evaluation"):  # also: a read-only --output fails here, not later
        policy = load_policy(args)
        summary = evaluate(policy, config, model=policy.base_model,
                           adapter=str(Path(args.adapter).resolve()) if args.adapter else None)
    print(f"method: {summary['method']}  model: {summary['model']}  samples/problem: {config.n_samples}  "
          f"T={config.sampling.temperature} top-p={config.sampling.top_p} "
          f"max-new-tokens={config.sampling.max_new_tokens}")
    print(summary_table(summary))
    print(f"thoughtfold: wrote {Path(config.output_dir) / 'samples.jsonl'} and "
          f"{Path(config.output_dir) / 'summary.json'}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- report


def add_report_parser(sub: argparse._SubParsersAction) -> None:
    """Register `thoughtfold report`."""
    p = sub.add_parser(
        "report", help="compare runs: markdown tables and PNG plots",
        description="Compare evaluation and training runs: accuracy by cache window per method (from "
        "eval summary.json files) and reward curves (from training metrics.jsonl), as one markdown "
        "page (printed and written as report.md) and PNG plots.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="eval output or training run directories")
    p.add_argument("--output", default="runs/report", metavar="DIR", help="where report.md and the plots go "
                   "[default: %(default)s]")
    p.set_defaults(func=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """Run `thoughtfold report`."""
    from ..evaluation.report import REPORT_NAME, build_report

    text, plots = build_report(args.runs, args.output)
    print(text, end="")
    print(f"thoughtfold: wrote {Path(args.output) / REPORT_NAME} and {len(plots)} plot(s) in {args.output}",
          file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- bench


def _lengths_arg(value: str) -> list[int]:
    try:
        lengths = [int(x) for x in value.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"lengths must be comma-separated integers, got {value!r}") from None
    if not lengths or min(lengths) < 1:
        raise argparse.ArgumentTypeError(f"lengths must be integers >= 1, got {value!r}")
    return lengths


def _names_arg(what: str, allowed: str) -> Callable[[str], tuple[str, ...]]:
    """A comma list of names, in the order given, from the tuple `allowed` ("module.NAME" in this
    package, imported only when parsing: building the parser must not import torch)."""

    def parse(value: str) -> tuple[str, ...]:
        module, name = allowed.rsplit(".", 1)
        choices = getattr(importlib.import_module(f"..{module}", __package__), name)
        names = tuple(m.strip() for m in value.split(",") if m.strip())
        unknown = [m for m in names if m not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what}(s) {', '.join(unknown) or repr(value)}; choose from {', '.join(choices)}"
            )
        return names

    return parse


def add_bench_parser(sub: argparse._SubParsersAction) -> None:
    """Register `thoughtfold bench`."""
    p = sub.add_parser(
        "bench", help="decode / replay / grpo / encoder micro-benchmarks with tables and plots",
        description="Random-init models of a named shape (nothing is downloaded). decode: tokens/s and "
        "peak memory vs generated length (bounded vs full cache vs HF generate); replay: time and peak "
        "memory of replay + backward vs completion length (PTE bounded, per --backprop mode, vs full-cache "
        "LoRA); grpo: one whole GRPO step vs completion length (same rows); encoder: "
        "encoder cost per eviction event; eviction: decode speed and GRPO step time per eviction policy. Prints the tables and writes bench.md, bench.json and a PNG per "
        "length sweep to --output.",
    )
    p.add_argument("which", nargs="?", default="all", choices=["decode", "replay", "grpo", "encoder", "eviction", "all"],
                   help="which benchmark [default: %(default)s]")
    p.add_argument("--shape", default="cpu-small", help="model shape: cpu-small, tiny (smoke test) or "
                   "qwen2.5-3b [default: %(default)s]")
    p.add_argument("--lengths", type=_lengths_arg, default=None, metavar="N1,N2,...",
                   help="generated / completion lengths [default: 256,1024,4096 decode; 512,2048,8192 replay; "
                   "512,1024,2048 grpo]")
    p.add_argument("--window", type=_number(int, "window"), default=256, metavar="W", help="[default: %(default)s]")
    p.add_argument("--batch-size", "--batch", dest="batch", type=_number(int, "batch-size"), default=4,
                   help="sequences per batch [default: %(default)s]")
    p.add_argument("--tokens", type=_number(int, "tokens"), default=1024,
                   help="encoder: tokens decoded [default: %(default)s]")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N [default: %(default)s]")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 [default: float32 on CPU, "
                   "bfloat16 on CUDA]")
    p.add_argument("--baseline-max", type=_number(int, "baseline-max"), default=None, metavar="N",
                   help="decode: run the full-cache and HF baselines only up to N new tokens "
                   "[default: every length]")
    p.add_argument("--methods", type=_names_arg("decode method", "evaluation.bench.run.DECODE_METHODS"), default=None, metavar="M1,M2,...",
                   help="decode: which of bounded, bounded-compiled, full, hf-static, hf to run "
                   "[default: all on CUDA; bounded,full,hf on CPU]")
    p.add_argument("--compile", action="store_true",
                   help="encoder: decode through torch.compile (compile_decode=True), as on a GPU run")
    p.add_argument("--backprop", type=_names_arg("backprop mode", "config.BACKPROP"), default=None,
                   metavar="B1,B2,...", help="replay, grpo: a PTE row per backprop mode (state, truncated, full); "
                   "LoRA's full cache never evicts, so its one row holds for every mode [default: all three]")
    p.add_argument("--rank", type=_number(int, "rank"), default=32, help="adapter rank [default: %(default)s]")
    p.add_argument("--global-tokens", type=_number(int, "global-tokens"), default=32,
                   help="PTE global tokens [default: %(default)s]")
    p.add_argument("--replay-batch", type=_number(int, "replay-batch"), default=None, metavar="N",
                   help="grpo: rows per replay micro-batch (TrainConfig.replay_batch_size), the same for PTE "
                   "and LoRA [default: the whole group]")
    p.add_argument("--evictions", type=_names_arg("eviction policy", "config.EVICTIONS"), default=None,
                   metavar="E1,E2,...", help="eviction: the policies compared (oldest, h2o, snapkv, headkv) "
                   "[default: all four]")
    p.add_argument("--output", default="runs/bench", metavar="DIR", help="[default: %(default)s]")
    p.set_defaults(func=cmd_bench)


def cmd_bench(args: argparse.Namespace) -> int:
    """Run `thoughtfold bench`."""
    import torch

    from ..config import BACKPROP, AdapterConfig
    from ..evaluation.bench.run import SHAPES, run_benchmarks

    if args.shape not in SHAPES:
        raise ConfigError(f"unknown shape {args.shape!r}; choose from {', '.join(sorted(SHAPES))}")
    for name in ("window", "batch", "tokens", "replay_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {args.device} requested but CUDA is not available")
    dtype = None
    if args.dtype is not None:
        dtype = getattr(torch, args.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ConfigError(f"unknown dtype {args.dtype!r}; use float32, bfloat16 or float16")
    result = run_benchmarks(args.which, args.shape, args.lengths, args.window, args.batch, args.tokens,
                            args.device, dtype, args.output, args.baseline_max, args.methods,
                            args.compile, AdapterConfig(rank=args.rank, global_tokens=args.global_tokens),
                            args.backprop or BACKPROP, args.replay_batch, args.evictions or EVICTIONS)
    written = ", ".join(str(p) for p in [Path(args.output) / "bench.md", Path(args.output) / "bench.json",
                                          *result["plots"]])
    print(f"thoughtfold: wrote {written}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- train / sft


def add_train_parsers(sub) -> None:
    """`thoughtfold grpo` (cache-aware GRPO; `train` is an alias) and `thoughtfold sft` (supervised,
    through the replay), as TRL names its `trl grpo` / `trl sft` commands."""
    for name, aliases, helptext in (
        ("grpo", ["train"], "RL-train with cache-aware GRPO; no arguments = the quickstart run on the bundled model"),
        ("sft", [], "supervised training through the replay (imitate dataset solutions or full-cache traces)"),
    ):
        p = sub.add_parser(name, aliases=aliases, help=helptext, description=helptext)
        p.add_argument("--config", default=None, metavar="FILE",
                       help="YAML config (see configs/); default: the built-in quickstart settings")
        p.add_argument("--resume", action="store_true",
                       help="continue from the last complete checkpoint in output_dir")
        p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. cache.window=64 adapter.mode=lora max_steps=50")
        p.set_defaults(func=cmd_train, trainer=name)


def cmd_train(args: argparse.Namespace) -> int:
    """Run `thoughtfold grpo` (alias `train`) / `thoughtfold sft`, then say where the results are
    and how to evaluate them."""
    from .. import GRPOTrainer, SFTTrainer
    from ..config import load_config

    bad = [o for o in args.overrides if "=" not in o]
    if bad:
        raise ConfigError(f"override {bad[0]!r} is not KEY=VALUE (e.g. cache.window=64)")
    overrides = [*args.overrides, *(["resume=true"] if args.resume else [])]
    config = load_config(args.config, overrides)
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


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    """The `thoughtfold` argument parser with all subcommands."""
    parser = _Parser(prog="thoughtfold", description="Reasoning LMs under a fixed-size KV cache "
                     "with Progressive Thought Encoding.")
    parser.add_argument("--version", action="version", version=f"thoughtfold {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_generate_parser(sub)
    add_eval_parser(sub)
    add_report_parser(sub)
    add_bench_parser(sub)
    add_train_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status."""
    log = logging.getLogger("thoughtfold")
    if not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("thoughtfold: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except _UsageError as e:
        return _fail(str(e))
    except ThoughtfoldError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `thoughtfold generate ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _fail(message: str) -> int:
    print(f"error: {' '.join(message.split())}", file=sys.stderr)
    return EXIT_USAGE

