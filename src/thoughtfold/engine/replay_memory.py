"""What one sequence costs a replay with backward, in bytes, from the model's shape: the figure a
trainer sizes its replay micro-batches by, so that the update's memory stays within a budget however
many rows a step has (docs/design.md §1.5).

Backward runs per segment, so a row holds at once the activations of its largest graph -- segment 0,
the prompt plus the thought tokens fed before the first event (every token with a full cache or
`backprop="full"`) -- its logits and their gradient, the detached K/V of its context, and under
`backprop="state"` the evicted K/V the state chain is recomputed from (under `full`, every
segment's context). The activations a decoder
layer keeps per token were counted on Llama / Qwen layers with adapters on every linear (the inputs
of the norms and of each adapter group, q, k, v and the attention output, the MLP's gate, up and
their product) and checked against measured peaks (tests/test_replay_memory.py).
"""

from __future__ import annotations

import math

import torch

from ..config import CacheConfig

SAVED_HIDDEN = 10  # hidden-size vectors a decoder layer keeps per token for backward
SAVED_KV = 2  # key and value vectors (num_key_value_heads x head_dim)
SAVED_INTERMEDIATE = 4  # MLP-width vectors
FLOAT32_LOGIT_COPIES = {"tokens": 0, "distribution": 2}  # a distribution loss's log-softmax + gradient


def _shape(config) -> tuple[int, int, int, int, int]:
    """(layers, hidden, K/V width, MLP width, vocabulary) of a transformers config."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    head_dim = getattr(text, "head_dim", None) or hidden // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    return (text.num_hidden_layers, hidden, kv_heads * head_dim, text.intermediate_size, text.vocab_size)


def replay_row_bytes(config, dtype: torch.dtype, prompt_tokens: int, completion_tokens: int,
                     cache: CacheConfig, backprop: str = "state", loss_input: str = "tokens") -> int:
    """Bytes one sequence of `prompt_tokens` + `completion_tokens` adds to a replay with backward of
    a model with this config, computing in `dtype` (see the module docstring)."""
    layers, hidden, kv, mlp, vocab = _shape(config)
    size = torch.empty((), dtype=dtype).element_size()
    bounded = cache.bounded and backprop != "full"
    fed = min(cache.window, completion_tokens) if bounded else completion_tokens
    graph_tokens = prompt_tokens + fed
    per_token = layers * (SAVED_HIDDEN * hidden + SAVED_KV * kv + SAVED_INTERMEDIATE * mlp) * size
    logits = (fed + 1) * vocab * (2 * size + 4 * FLOAT32_LOGIT_COPIES[loss_input])  # + their gradient
    kv_tokens = graph_tokens
    if backprop == "state":
        kv_tokens += max(completion_tokens - fed, 0)
    elif backprop == "full" and cache.bounded:  # every segment's attention keeps its context
        kv_tokens += math.ceil(max(completion_tokens - cache.window, 0) / cache.evict_block) * (
            prompt_tokens + cache.window)
    return graph_tokens * per_token + logits + layers * 2 * kv * size * kv_tokens


def rows_within(budget_bytes: float, row_bytes: int) -> int:
    """How many rows of `row_bytes` a replay micro-batch takes under `budget_bytes` (at least one)."""
    return max(1, int(budget_bytes // max(row_bytes, 1)))
