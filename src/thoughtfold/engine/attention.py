"""Grouped-query attention for the one-token decode step, registered in transformers' attention
registry as "thoughtfold_sdpa" (docs/design.md §3: decode is memory-bound, so K/V must be read once).

transformers' SDPA path repeats every K/V head for its query heads (`repeat_kv`) whenever a mask is
given on CUDA, which multiplies the cache traffic of a decode step by the group size (8 for
Qwen2.5-3B). Our decode always passes a mask (the bounded cache's slot validity), so for a single
query token we fold the group's query heads into the query-length axis instead:
[B, H, 1, D] -> [B, H_kv, H/H_kv, D]; every query of a group attends the same K/V head under the
same per-sequence mask. Longer queries (prefill, replay) go to transformers' own SDPA function.

During a rollout under a scored eviction policy, each attention module also carries the rollout's
`AttentionStats`, and the decode step records the attention every cached slot received.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from ..errors import ConfigError
from .attention_stats import STATS_ATTR, AttentionStats

NAME = "thoughtfold_sdpa"


def grouped_decode_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, H, T, D], key/value [B, H_kv, S, D] -> (output [B, T, H, D], None)."""
    batch, heads, q_len, _ = query.shape
    kv_heads = key.shape[1]
    stats = getattr(module, STATS_ATTR, None)
    if stats is not None and q_len == 1:
        stats.observe(module.layer_idx, query, key, attention_mask, scaling)
    mask = attention_mask
    masked_per_sequence = mask is None or (mask.dim() == 4 and mask.shape[1] == 1)
    if q_len != 1 or heads == kv_heads or not masked_per_sequence or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    grouped = query.reshape(batch, kv_heads, heads // kv_heads, query.shape[-1])
    out = F.scaled_dot_product_attention(grouped, key, value, attn_mask=attention_mask,
                                         dropout_p=dropout, scale=scaling)
    return out.reshape(batch, heads, 1, value.shape[-1]).transpose(1, 2), None


AttentionInterface.register(NAME, grouped_decode_attention)
AttentionMaskInterface.register(NAME, sdpa_mask)  # 2D masks from other callers build as for "sdpa"


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The self-attention module of every decoder layer, in layer order."""
    return [layer.self_attn for layer in model.get_decoder().layers]


@contextmanager
def observing(model: nn.Module, stats: AttentionStats | None) -> Iterator[None]:
    """Within the block, decode steps record their attention into `stats` (None: nothing is recorded,
    also inside an outer block: a prefill between decode steps observes nothing)."""
    modules = attention_modules(model)
    held = [getattr(module, STATS_ATTR, None) for module in modules]
    if stats is None and not any(h is not None for h in held):
        yield
        return
    if stats is not None and getattr(model.config, "_attn_implementation", None) != NAME:
        raise ConfigError(f"scored eviction reads attention weights in the {NAME!r} attention function, but "
                          f"the model uses {model.config._attn_implementation!r}: load it with "
                          "attn_implementation='sdpa'")
    for module in modules:
        setattr(module, STATS_ATTR, stats)
    try:
        yield
    finally:
        for module, previous in zip(modules, held, strict=True):
            if previous is None:
                delattr(module, STATS_ATTR)
            else:
                setattr(module, STATS_ATTR, previous)


def switch_attention(model: nn.Module, name: str | None) -> str | None:
    """Set the model's attention implementation to `name` (None: leave it as it is); returns the
    implementation it had, so that ``switch_attention(model, previous)`` undoes the switch."""
    previous = getattr(model.config, "_attn_implementation", None)
    if name is not None and name != previous:
        model.set_attn_implementation(name)
    return previous


def use_grouped_decode(model: nn.Module) -> str | None:
    """Switch a model on transformers' SDPA attention to the grouped decode path (same results, one
    read of K/V per step). Models on another implementation (eager, flash) are left as they are.
    Returns the implementation the model had (see `switch_attention`)."""
    current = getattr(model.config, "_attn_implementation", None)
    return switch_attention(model, NAME if current == "sdpa" else None)
