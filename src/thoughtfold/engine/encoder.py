"""Thought encoder (docs/design.md §1): per layer, r learnable queries attend over the global tokens and
every thought token evicted so far; the result is the r x r state S_l that modulates the adapter.

The attention is kept exactly and in O(1) memory with online-softmax accumulators (running max m,
normaliser z, numerator n), updated once per eviction event:  S = n / z. All layers are processed
together: every tensor carries a leading layer dimension. Updates are functional (no in-place
ops), so the same code serves the no-grad rollout and the autograd replay.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..config import AdapterConfig

_NEG = -1e30  # finite "minus infinity": exp(_NEG - m) underflows to exactly 0 without NaN gradients


@dataclass
class EncoderState:
    """Per-layer, per-sequence encoder state. `exact`: online-softmax accumulators
    (max [L,B,r], norm [L,B,r], num [L,B,r,r]); `paper`: only `num` holds S."""

    max: torch.Tensor | None
    norm: torch.Tensor | None
    num: torch.Tensor

    def detach(self) -> EncoderState:
        return EncoderState(*(None if t is None else t.detach() for t in (self.max, self.norm, self.num)))

    def read(self) -> torch.Tensor:
        """The state S [L, B, r, r] that the adapters consume."""
        if self.norm is None:
            return self.num
        return self.num / self.norm.clamp_min(1e-30).unsqueeze(-1)


def derotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo HF rotary embedding: keys [..., heads, n, head_dim], cos/sin [..., n, head_dim].

    RoPE maps (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) per frequency, so the inverse is
    (y1 c + y2 s, y2 c - y1 s) / (c^2 + s^2); the division also undoes an attention scaling
    folded into cos/sin (YaRN-style rope)."""
    cos, sin = cos.unsqueeze(-3), sin.unsqueeze(-3)
    half = keys.shape[-1] // 2
    y1, y2 = keys[..., :half], keys[..., half:]
    c1, s1 = cos[..., :half], sin[..., :half]
    c2, s2 = cos[..., half:], sin[..., half:]
    x1 = (y1 * c1 + y2 * s2) / (c1 * c1 + s1 * s1)
    x2 = (y2 * c2 - y1 * s1) / (c2 * c2 + s2 * s2)
    return torch.cat([x1, x2], dim=-1)


class ThoughtEncoder(nn.Module):
    """Learnable queries Q_l (r x d_a), projections W_K (d_kv x d_a) and W_V (d_kv x r), and n_g
    global tokens in each layer's KV space, for all L layers at once."""

    def __init__(self, num_layers: int, kv_dim: int, config: AdapterConfig):
        super().__init__()
        r, d_a, n_g = config.rank, config.attention_dim, config.global_tokens
        self.rank, self.attention_dim = r, d_a
        self.state_update = config.state_update
        self.global_only = config.global_only
        self.queries = nn.Parameter(torch.randn(num_layers, r, d_a))
        self.key_proj = nn.Parameter(torch.randn(num_layers, kv_dim, d_a) / math.sqrt(kv_dim))
        self.value_proj = nn.Parameter(torch.randn(num_layers, kv_dim, r) / math.sqrt(kv_dim))
        self.global_keys = nn.Parameter(torch.randn(num_layers, n_g, kv_dim))
        self.global_values = nn.Parameter(torch.randn(num_layers, n_g, kv_dim))

    @staticmethod
    def parameter_count(num_layers: int, kv_dim: int, config: AdapterConfig) -> int:
        """The parameters an encoder of these sizes holds (computed: nothing is allocated)."""
        r, d_a, n_g = config.rank, config.attention_dim, config.global_tokens
        return num_layers * (r * d_a + kv_dim * (d_a + r) + 2 * n_g * kv_dim)

    @property
    def num_global(self) -> int:
        return self.global_keys.shape[1]

    def _scores_values(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys/values [L, B, n, d_kv] (position-free) -> scores [L, B, r, n] and projected values
        [L, B, n, r]."""
        k = torch.einsum("lbnd,lda->lbna", keys.to(self.key_proj.dtype), self.key_proj)
        scores = torch.einsum("lra,lbna->lbrn", self.queries, k) / math.sqrt(self.attention_dim)
        v = torch.einsum("lbnd,ldr->lbnr", values.to(self.value_proj.dtype), self.value_proj)
        return scores, v

    def initial_state(self, batch: int) -> EncoderState:
        """State before any eviction: attention over the global tokens (zero when there are none)."""
        num_layers, r = self.queries.shape[0], self.rank
        kw = {"device": self.queries.device, "dtype": self.queries.dtype}
        if self.state_update == "paper":
            empty = EncoderState(None, None, torch.zeros(num_layers, batch, r, r, **kw))
        else:
            empty = EncoderState(
                torch.full((num_layers, batch, r), _NEG, **kw),
                torch.zeros(num_layers, batch, r, **kw),
                torch.zeros(num_layers, batch, r, r, **kw),
            )
        if self.num_global == 0:
            return empty
        expand = (num_layers, batch, *self.global_keys.shape[1:])
        keys, values = self.global_keys[:, None].expand(expand), self.global_values[:, None].expand(expand)
        return self._absorb(empty, keys, values)

    def absorb(self, state: EncoderState, keys: torch.Tensor, values: torch.Tensor) -> EncoderState:
        """Fold one evicted block (position-free keys/values [L, B, E, d_kv]) into the state.
        With `global_only` the state stays at its initial value (the ablation)."""
        if self.global_only:
            return state
        return self._absorb(state, keys, values)

    def _absorb(self, state: EncoderState, keys: torch.Tensor, values: torch.Tensor) -> EncoderState:
        scores, v = self._scores_values(keys, values)
        if self.state_update == "paper":
            block = torch.softmax(scores, dim=-1) @ v
            s = state.num + block
            return EncoderState(None, None, s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6))
        # the running max only stabilises exp(); the result does not depend on it, so no gradient
        new_max = torch.maximum(state.max, scores.amax(-1)).detach()
        carry = torch.exp(state.max - new_max)
        p = torch.exp(scores - new_max.unsqueeze(-1))
        norm = state.norm * carry + p.sum(-1)
        num = state.num * carry.unsqueeze(-1) + p @ v
        return EncoderState(new_max, norm, num)
