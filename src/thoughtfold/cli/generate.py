"""`thoughtfold generate`: generate completions with a bounded KV cache: the prompt is pinned and at
most WINDOW generated tokens are kept; when the window is full the oldest ceil(R*WINDOW) are evicted."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..checks import SEED_LIMIT, is_token_ids
from ..errors import DataError
from ..messages import checked_conversation, is_conversation
from . import flags

NAME = "generate"
HELP = "generate text under a bounded KV cache"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompts-file", metavar="F.jsonl",
                     help='JSONL file, one prompt per line: {"prompt": "..."}, {"prompt": [messages]} or '
                     'a JSON string ("-" = stdin)')
    flags.add_model_flags(p, adapter_help="load a trained thoughtfold adapter (with its base model and cache "
                          "settings unless --model / --window / --evict-ratio are given)")
    flags.add_cache_flags(p)
    flags.add_sampling_flags(p, max_new_tokens=256, temperature=0.0, top_p=1.0, seed=None)
    flags.add_prompt_flags(p, None, "system message (with the chat template)")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="stop when the text contains STR (repeatable)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object per prompt: text, completion_ids, logprobs, evictions, "
                   "peak_cache_tokens")


def run(args: argparse.Namespace) -> int:
    """Generate for every prompt, `--batch-size` at a time; settings are checked before the model loads."""
    from ..policy import concat_rollouts
    from .streamer import TerminalStreamer

    cache = flags.cache_config(args, "window", "evict_ratio", "eviction")
    sampling = flags.sampling_config(args)
    if args.prompt is not None and not args.prompt.strip():
        raise DataError("the prompt is empty")
    prompts = [args.prompt] if args.prompt is not None else read_prompts_file(args.prompts_file)
    policy = flags.load_policy(args, cache=cache)
    stream = len(prompts) == 1 and not args.json
    results = []
    for start in range(0, len(prompts), args.batch_size):
        batch = prompts[start : start + args.batch_size]
        streamer = TerminalStreamer(policy.tokenizer, policy.eos_token_ids, args.stop) if stream else None
        seed = None if sampling.seed is None else (sampling.seed + start) % SEED_LIMIT
        res = policy.generate(batch, **replace(sampling, seed=seed).to_dict(),
                              chat_template=not args.no_chat_template, stop=args.stop or None,
                              streamer=streamer, system_prompt=args.system_prompt, slots=args.slots)
        for i in range(len(batch)):
            if args.json:
                record = {"text": res.texts[i], "completion_ids": res.completion_ids[i],
                          "logprobs": res.logprobs[i], "evictions": res.evictions[i],
                          "peak_cache_tokens": res.peak_cache_tokens[i]}
                print(json.dumps(record, ensure_ascii=False), flush=True)
            elif not stream:
                print(f"=== [{start + i + 1}/{len(prompts)}] ===")
                print(res.texts[i], flush=True)
        results.append(res)
    totals = concat_rollouts(results)
    stats, events = totals.stats, totals.evictions  # events per sequence, within its own length
    rate = stats["generated_tokens"] / stats["seconds"] if stats["seconds"] > 0 else 0.0
    window = "full cache" if cache.window is None else f"window {cache.window}, evict {cache.evict_block}"
    print(f"thoughtfold: {len(prompts)} prompt(s), {stats['generated_tokens']} tokens in "
          f"{stats['seconds']:.2f} s ({rate:.1f} tokens/s); eviction events per sequence: "
          f"{sum(events) / len(events):.1f} mean, "
          f"{max(events)} max; peak cache {stats['peak_cache_tokens']} tokens ({window})", file=sys.stderr)
    return 0


def read_prompts_file(path: str | Path) -> list[str | list[int] | list[dict]]:
    """Prompts from a JSONL file ('-' = stdin): each non-blank line is a JSON object with a
    "prompt" field (a string, a conversation: TRL's list of {"role", "content"} messages, or a list
    of token ids) or a bare JSON string. A malformed line raises DataError naming the file and the
    line number."""
    from ..tasks.data import read_jsonl

    name = "<stdin>" if str(path) == "-" else str(path)
    prompts = [_prompt(item, where) for where, item in read_jsonl(path, "prompts file", name, objects=False)]
    if not prompts:
        raise DataError(f"prompts file {name} has no prompts")
    return prompts


def _prompt(item: Any, where: str) -> str | list[int] | list[dict]:
    """The prompt of one line of a prompts file."""
    if isinstance(item, dict):
        if "prompt" not in item:
            keys = ", ".join(map(str, item)) or "none"
            raise DataError(f'{where}: no "prompt" field (keys found: {keys})')
        item = item["prompt"]
        if is_conversation(item):
            return checked_conversation(item, where)
        if isinstance(item, list):
            if not is_token_ids(item):
                raise DataError(f'{where}: a list "prompt" must be messages ({{"role", "content"}} '
                                "objects) or a non-empty list of token ids (integers >= 0)")
        elif not isinstance(item, str):
            raise DataError(f'{where}: "prompt" must be a string, got {_json_type(item)}')
    elif not isinstance(item, str):
        raise DataError(f'{where}: expected a JSON object with a "prompt" field or a JSON string, '
                        f"got {_json_type(item)}")
    if isinstance(item, str) and not item.strip():
        raise DataError(f"{where}: the prompt is empty")
    return item


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number")
