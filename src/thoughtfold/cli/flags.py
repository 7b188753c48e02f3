"""The flag groups several commands share, each declared once (`generate` and `eval` differ only in
their sampling defaults), the argument types they parse with, and the settings objects built from
them. Range checks are the settings' own (CacheConfig, SamplingConfig, ...): a flag's type only
turns the text into a value."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from ..config import EVICTIONS, CacheConfig, SamplingConfig

COMPILE_HELP = ("run the decode step through torch.compile (on CUDA its fused kernels are then captured "
                "as a CUDA graph: ~1.5x faster decoding, after a compilation of a minute or two)")


def number(kind: type, what: str) -> Callable[[str], Any]:
    """An argument type: `kind` (int or float) of the text, or a one-line error naming `what`."""

    def parse(value: str):
        try:
            return kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {value!r}") from None

    parse.__name__ = what
    return parse


def count(what: str) -> Callable[[str], int]:
    """An argument type: a whole number >= 1 (a count no settings object checks, such as a batch size)."""
    as_int = number(int, what)

    def parse(value: str) -> int:
        n = as_int(value)
        if n < 1:
            raise argparse.ArgumentTypeError(f"{what} must be >= 1, got {n}")
        return n

    parse.__name__ = what
    return parse


def window(value: str) -> int | None:
    """`--window`: an integer, or 'none'/'full' for a full cache. Range checks are CacheConfig's."""
    if value.strip().lower() in ("none", "full"):
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"window must be an integer >= 1 or 'none' (full cache), got {value!r}") from None


def windows(value: str) -> list[int | None]:
    """`eval --window`: comma-separated integers and/or 'none' (full cache)."""
    parts = [p for p in value.split(",") if p.strip()]
    if not parts:
        raise argparse.ArgumentTypeError("window list is empty: give e.g. 256,512,none")
    return [window(p) for p in parts]


def comma_list(kind: Callable[[str], Any], what: str, items: str = "names") -> Callable[[str], list]:
    """An argument type: a comma-separated list of `kind` values (`items` says what they are)."""

    def parse(value: str) -> list:
        try:
            return [kind(x.strip()) for x in value.split(",") if x.strip()]
        except (ValueError, argparse.ArgumentTypeError):
            message = f"{what} must be comma-separated {items}, got {value!r}"
            raise argparse.ArgumentTypeError(message) from None

    parse.__name__ = what
    return parse


def add_model_flags(p: argparse.ArgumentParser, adapter_help: str) -> None:
    """--model, --adapter, --dtype, --device, --compile: what to load, and how it decodes."""
    p.add_argument("--model", default=None, help="hub id, local directory, or 'default' "
                   "(bundled SmolLM2-135M-Instruct) [default: the adapter's base model, else default]")
    p.add_argument("--adapter", default=None, metavar="DIR", help=adapter_help)
    p.add_argument("--dtype", default=None, help="float32, bfloat16, float16 or auto "
                   "[default: float32 on CPU, bfloat16 on CUDA]")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N [default: cuda if available]")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)


def add_cache_flags(p: argparse.ArgumentParser, window_list: bool = False) -> None:
    """--window (one, or with `window_list` several: each is evaluated), --evict-ratio, --eviction.
    Unset flags are absent from the parsed arguments: with --adapter they are the adapter's saved
    settings (`cache_config`)."""
    if window_list:
        p.add_argument("--window", type=windows, default=argparse.SUPPRESS, metavar="W1,W2,...|none",
                       help="cache windows to evaluate under ('none' = full cache) "
                       "[default: the adapter's window, else none]")
    else:
        p.add_argument("--window", type=window, default=argparse.SUPPRESS, metavar="W",
                       help="thought tokens kept in the cache, or 'none' for a full cache "
                       "[default: the adapter's, else none]")
    p.add_argument("--evict-ratio", type=number(float, "evict-ratio"), default=argparse.SUPPRESS, metavar="R",
                   help="fraction of the window evicted at once, in (0, 1] "
                   "[default: the adapter's, else 0.25]")
    p.add_argument("--eviction", choices=EVICTIONS, default=argparse.SUPPRESS,
                   help="which tokens an eviction removes: the oldest block, or per sequence and layer by "
                   "attention received (h2o, snapkv, headkv) [default: the adapter's, else oldest]")


def add_sampling_flags(p: argparse.ArgumentParser, max_new_tokens: int, temperature: float, top_p: float,
                       seed: int | None) -> None:
    """--max-new-tokens, --temperature, --top-p, --top-k, --seed, with the command's defaults."""
    p.add_argument("--max-new-tokens", type=number(int, "max-new-tokens"), default=max_new_tokens,
                   metavar="N", help="[default: %(default)s]")
    p.add_argument("--temperature", type=number(float, "temperature"), default=temperature, metavar="T",
                   help="sampling temperature; 0 = greedy [default: %(default)s]")
    p.add_argument("--top-p", type=number(float, "top-p"), default=top_p, help="[default: %(default)s]")
    p.add_argument("--top-k", type=number(int, "top-k"), default=0, help="0 = off [default: %(default)s]")
    p.add_argument("--seed", type=number(int, "seed"), default=seed, metavar="S", help="sampling seed"
                   + (" [default: %(default)s]" if seed is not None else ""))


def add_prompt_flags(p: argparse.ArgumentParser, system_prompt: str | None, system_help: str) -> None:
    """--system-prompt, --no-chat-template, --batch-size (prompts per generate call), --slots (of them,
    how many decode at once)."""
    p.add_argument("--system-prompt", default=system_prompt, help=system_help)
    p.add_argument("--no-chat-template", action="store_true", help="encode prompts as plain text")
    p.add_argument("--batch-size", type=count("batch-size"), default=16, metavar="B",
                   help="prompts generated per call [default: %(default)s]")
    p.add_argument("--slots", type=count("slots"), default=None, metavar="S",
                   help="sequences decoding at once: with fewer slots than --batch-size, a finished "
                   "sequence's slot takes the next prompt (continuous batching); the outputs do not "
                   "change [default: the batch size]")


def cache_config(args: argparse.Namespace, *fields: str, **values: Any) -> CacheConfig:
    """The CacheConfig from the cache flags among `fields` that were given, and `values`. With
    --adapter the others are its saved settings (persist.adapter_settings), else CacheConfig's
    defaults (a full cache)."""
    from ..persist import adapter_settings

    given = {name: getattr(args, name) for name in fields if hasattr(args, name)} | values
    if args.adapter is not None:
        return adapter_settings(args.adapter, **given)[1]
    return CacheConfig(**given)


def sampling_config(args: argparse.Namespace) -> SamplingConfig:
    return SamplingConfig(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)


def quiet_transformers() -> None:
    """Silence transformers' own progress bars and warnings (a command prints what matters itself)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_policy(args: argparse.Namespace, cache: CacheConfig | None = None):
    """The Policy of the model flags: --model, else the adapter's base model, else the bundled
    default (Policy.from_pretrained decides); transformers' own progress bars and warnings silenced."""
    from ..policy import Policy

    quiet_transformers()
    return Policy.from_pretrained(model=args.model, cache=cache, adapter_path=args.adapter, dtype=args.dtype,
                                  device=args.device, compile_decode=args.compile)
