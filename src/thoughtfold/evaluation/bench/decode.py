"""The decode benchmark: tokens/s and peak memory against the generated length, the bounded cache
against our full cache and HF `generate` (its dynamic cache, or its static cache + torch.compile);
on CUDA also each bounded step's share of the memory-bandwidth floor (docs/design.md §3), and for
every captured or compiled step a check that it decodes the tokens eager decoding does."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from ...config import CacheConfig
from ...engine.attention import switch_attention
from ...models import head_dim
from ...policy import Policy
from .config import BenchConfig
from .measure import copy_bandwidth, measure, progress, random_model, random_prompts
from .table import Table

TITLE = "Decode: tokens/s and peak memory vs generated length"
PROMPT_TOKENS = 32
CHECK_TOKENS = 64  # greedy tokens per sequence compared between a captured/compiled step and eager
BASELINES = ("full", "hf", "hf-static")


def decode_benchmark(config: BenchConfig) -> Table:
    """Decode `length` new tokens with each method: `bounded` (CUDA graph on a GPU),
    `bounded-compiled` (torch.compile + CUDA graph), `full` (our full cache), `hf` (HF generate) and
    `hf-static` (HF static cache + torch.compile). The baselines run only up to `baseline_max` new
    tokens (a full cache is slow and large at long lengths). Each method is warmed up (compiled) and
    measured before the next starts."""
    model = random_model(config.shape, config.device, getattr(torch, config.dtype_name))
    ids = random_prompts(config.shape, config.batch, PROMPT_TOKENS)
    labels = _labels(config)
    speed: dict[tuple[int, str], float] = {}
    peak: dict[tuple[int, str], float] = {}
    checks = []
    for method in config.methods:
        todo = [n for n in config.lengths_for("decode")
                if method not in BASELINES or config.baseline_max is None or n <= config.baseline_max]
        if not todo:
            continue
        run, check = _method(model, ids, method, config)
        if check is not None:
            checks.append((labels[method], check))
        with use_attention(model, "sdpa" if method.startswith("hf") else None):
            for n in todo:
                if method == "hf-static" or (method == "hf" and n == todo[0]):
                    run(n if method == "hf-static" else 16)  # compilation per static-cache length; first call
                took, peak_bytes, _ = measure(lambda n=n, run=run: run(n), config.device)
                speed[n, method], peak[n, method] = config.batch * n / took, peak_bytes / 2**20
                progress(f"decode {n} new tokens, {labels[method]}: {speed[n, method]:,.0f} tokens/s, "
                         f"peak {peak[n, method]:,.1f} MiB")
    table = Table(TITLE, ["new tokens", "method", "tokens/s", "peak MiB"], [None, None, "{:,.0f}", "{:,.1f}"],
                  plot={2: "tokens/s", 3: "peak memory (MiB)"}, xlabel="generated tokens")
    _add_rows(table, model, speed, peak, labels, config)
    for label, verdict in checks:
        table.add(CHECK_TOKENS, f"{label}: tokens vs eager decoding (greedy)", verdict, None, kind="check")
    return table


def _labels(config: BenchConfig) -> dict[str, str]:
    graph = " (CUDA graph)" if config.cuda else ""
    w = config.window
    return {"bounded": f"bounded W={w}{graph}",
            "bounded-compiled": f"bounded W={w} (compiled{graph and ' + graph'})",
            "full": "full cache (ours)", "hf-static": "HF static cache + compile", "hf": "HF generate"}


def _method(model, ids: list[list[int]], method: str,
            config: BenchConfig) -> tuple[Callable[[int], object], str | None]:
    """The call that decodes n new tokens with `method`, warmed up; for a captured or compiled
    step also the verdict of its check against eager decoding."""
    if method.startswith("hf"):
        prompts = torch.tensor(ids, device=config.device)
        static = {"cache_implementation": "static"} if method == "hf-static" else {}

        def hf(n: int) -> object:
            mask = torch.ones_like(prompts)
            return model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=0, **static)

        return hf, None
    cache = CacheConfig(window=None if method == "full" else config.window)
    policy = Policy(model, None, cache=cache, compile_decode=method == "bounded-compiled")
    policy.generate(ids, max_new_tokens=config.window + 8, temperature=0)  # set-up costs, compilation
    captured = policy.cuda_graph or policy.compile_decode
    check = agreement_with_eager(policy, ids, CHECK_TOKENS) if captured else None
    return (lambda n: policy.generate(ids, max_new_tokens=n, temperature=0)), check


def _add_rows(table: Table, model, speed: dict[tuple[int, str], float], peak: dict[tuple[int, str], float],
              labels: dict[str, str], config: BenchConfig) -> None:
    """Per length: each method's tokens/s and peak memory, the fastest bounded method against each HF
    one, and on CUDA each bounded step's share of the bandwidth floor."""
    bandwidth = copy_bandwidth(config.device) if config.cuda else None
    for n in config.lengths_for("decode"):
        measured = [m for m in config.methods if (n, m) in speed]
        for m in measured:
            table.add(n, labels[m], speed[n, m], peak[n, m])
        bounded = [m for m in measured if m.startswith("bounded")]
        best = max(bounded, key=lambda m: speed[n, m], default=None)
        for m in measured:
            if best and m.startswith("hf"):
                table.add(n, f"{labels[best]} / {labels[m]}", speed[n, best] / speed[n, m], None,
                          kind="ratio")
        for m in bounded if bandwidth is not None else []:
            cached = PROMPT_TOKENS + min(n, config.window)
            floor = decode_floor_seconds(model, config.batch, cached, bandwidth)
            what = f"{labels[m]} step vs floor ({floor * 1e3:.2f} ms at {bandwidth / 1e12:.2f} TB/s copy)"
            table.add(n, what, floor * speed[n, m] / config.batch, None, kind="share")


def decode_floor_seconds(model, batch: int, cached_tokens: int, bandwidth: float) -> float:
    """docs/design.md §3's floor for one decode step: read every weight once (the input embedding table
    only as the output projection) plus the K/V of `cached_tokens` per sequence."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    element = next(model.parameters()).element_size()
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim(cfg) * element * cached_tokens * batch
    return (weights + kv) / bandwidth


def agreement_with_eager(policy: Policy, ids: list[list[int]], tokens: int) -> str:
    """Decode `tokens` greedy tokens with `policy` (CUDA graph and/or compiled step) and with the same
    model decoding eagerly, and say whether the tokens agree (the bench's correctness check)."""
    eager = Policy(policy.model, None, cache=policy.cache_config, cuda_graph=False)
    want = eager.generate(ids, max_new_tokens=tokens, temperature=0).completion_ids
    got = policy.generate(ids, max_new_tokens=tokens, temperature=0).completion_ids
    differ = [t for g, w in zip(got, want, strict=True) if (t := first_difference(g, w)) is not None]
    if not differ:
        return f"same ({len(ids)} x {tokens} tokens)"
    return f"{len(differ)} of {len(ids)} sequences differ, first at token {min(differ)}"


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (a length difference counts); None if equal."""
    first = next((t for t, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return None if first == len(a) == len(b) else first


@contextmanager
def use_attention(model, name: str | None) -> Iterator[None]:
    """Run HF's own baselines on its stock attention function (the policies switch the model to the
    grouped decode path); `None` leaves the model as it is."""
    previous = switch_attention(model, name)
    try:
        yield
    finally:
        switch_attention(model, previous)
