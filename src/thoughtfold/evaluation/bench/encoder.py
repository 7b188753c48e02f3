"""The encoder benchmark: what PTE adds to decoding. The encoder's cost per eviction event against the
decode time of the E tokens between events, and whole rollouts with no adapter, a static LoRA, PTE,
and PTE with one adapter GEMM per linear (no grouping of the siblings that read one input)."""

from __future__ import annotations

import statistics
from dataclasses import replace

import torch

from ...config import CacheConfig
from ...engine.adapter import AdapterGroup
from ...policy import Policy
from .config import BenchConfig
from .measure import progress, random_model, random_prompts, seconds
from .table import Table

TITLE = "Encoder overhead per eviction event"
REPEATS = 3  # rollouts per variant; their median is its time


def encoder_benchmark(config: BenchConfig) -> Table:
    """Rollouts of `tokens` tokens per variant (the median of REPEATS runs after a warm-up, which
    compiles with `compile_decode`), then the encoder's absorb of one evicted block, timed alone."""
    model = random_model(config.shape, config.device, getattr(torch, config.dtype_name))
    ids = random_prompts(config.shape, config.batch)
    times: dict[str, float] = {}
    for mode in ("none", "lora", "pte"):
        policy = Policy(model, None, cache=CacheConfig(window=config.window),
                        adapter=replace(config.adapter, mode=mode), compile_decode=config.compile_decode)
        times[mode], events = _rollout_seconds(policy, ids, config, mode)
        if mode == "pte":
            for wrapper in policy.wrappers:
                wrapper.group = AdapterGroup([wrapper])
            times["pte ungrouped"], _ = _rollout_seconds(policy, ids, config, "pte ungrouped")
        policy.unwrap()  # the next policy wraps a clean model
    block, per_event = _absorb_seconds(policy, config)  # the pte policy's
    step = times["none"] / config.tokens
    compiled = ", compiled" if config.compile_decode else ""
    table = Table(TITLE, ["measure", "value"], [None, None])
    table.add(f"decode step (no adapter{compiled})", step * 1e3, kind="ms")
    table.add(f"encoder absorb, one event (E={block})", per_event * 1e3, kind="ms")
    table.add("encoder / decode of E tokens", per_event / (step * block), kind="share")
    table.add(f"PTE rollout / plain bounded rollout ({config.tokens} tokens, {events} events)",
              times["pte"] / times["none"], kind="ratio")
    table.add("LoRA rollout / plain bounded rollout (adapter matmuls alone)", times["lora"] / times["none"],
              kind="ratio")
    table.add("PTE with one adapter GEMM per linear (no sibling grouping) / plain",
              times["pte ungrouped"] / times["none"], kind="ratio")
    return table


def _rollout_seconds(policy: Policy, ids: list[list[int]], config: BenchConfig,
                     label: str) -> tuple[float, int]:
    """The median time of a greedy rollout of `tokens` tokens, and its eviction events."""
    policy.generate(ids, max_new_tokens=config.window + 8, temperature=0)  # warm-up: set-up, compilation
    results = []
    runs = [seconds(lambda: results.append(policy.generate(ids, max_new_tokens=config.tokens, temperature=0)),
                    config.device) for _ in range(REPEATS)]
    progress(f"encoder bench: {label} rollout of {config.tokens} tokens: {statistics.median(runs):.2f} s")
    return statistics.median(runs), results[-1].stats["evictions"]


def _absorb_seconds(policy: Policy, config: BenchConfig) -> tuple[int, float]:
    """(E, seconds of one encoder absorb of E evicted tokens per sequence), timed over 20 calls."""
    block, encoder = policy.cache_config.evict_block, policy.encoder
    layers, kv_dim = encoder.key_proj.shape[:2]
    keys = torch.randn(layers, config.batch, block, kv_dim, device=config.device)
    state = encoder.initial_state(config.batch)
    with torch.no_grad():
        encoder.absorb(state, keys, keys)
        took = seconds(lambda: [encoder.absorb(state, keys, keys) for _ in range(20)], config.device)
        return block, took / 20
