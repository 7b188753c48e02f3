"""Bounded KV cache (docs/design.md §1): the prompt is pinned, thought tokens live in a window of at most
W slots, and a full window evicts a block of ceil(rho*W) tokens at once.

Storage is preallocated (static shapes): one buffer per layer holding the P prompt slots followed by
the W window slots, used as a ring. Which thought token sits in which slot is host-side bookkeeping
(`ThoughtWindow`), so the decode step does no host sync; the device only sees the slot to write and
a validity mask. Positions are never stored: keys are cached already rotated at their true absolute
positions, exactly as the model's own cache does, so attention is order-free over the slots.
"""

from __future__ import annotations

import bisect
import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .eviction import EvictionEvent, EvictionPolicy, OldestBlock


class ThoughtWindow:
    """Host-side bookkeeping of the window: which thought tokens are cached, and in which slot.

    The schedule is a pure function of (capacity, block, step): an event happens whenever a new
    token arrives at a full window. With `OldestBlock` the slots form a ring (token t sits in slot
    t mod W), but any policy works because freed slots are reused in order.
    """

    def __init__(self, capacity: int, block: int, eviction_policy: EvictionPolicy | None = None):
        self.capacity = capacity
        self.block = block
        self.eviction_policy = eviction_policy or OldestBlock()
        self.cached: list[int] = []  # thought indices, ascending
        self.slot_of: dict[int, int] = {}
        self._free = list(range(capacity))[::-1]  # a stack; pop() gives the lowest slot first

    @property
    def full(self) -> bool:
        return len(self.cached) >= self.capacity

    def evict(self, step: int) -> tuple[EvictionEvent, list[int]]:
        """Remove a block chosen by the policy; returns the event and the freed slots."""
        chosen = sorted(self.eviction_policy.select(self.cached, self.block))
        if not chosen or any(t not in self.slot_of for t in chosen):
            raise RuntimeError(f"eviction policy returned tokens that are not cached: {chosen}")
        slots = [self.slot_of.pop(t) for t in chosen]
        gone = set(chosen)
        self.cached = [t for t in self.cached if t not in gone]
        # freed slots are reused oldest-token-first, which keeps OldestBlock a plain ring
        self._free.extend(reversed(slots))
        return EvictionEvent(step=step, tokens=tuple(chosen)), slots

    def admit(self, token: int) -> int:
        slot = self._free.pop()
        self.slot_of[token] = slot
        bisect.insort(self.cached, token)
        return slot


def cache_kwarg(model: torch.nn.Module) -> str:
    """Name under which `model.forward` takes a cache: transformers renamed `past_key_values` to
    `cache` (5.2x); we support both."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Cursor:
    """The slots the current forward pass writes to, shared by all layers."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None


class RingLayer(CacheLayerMixin):
    """One layer's preallocated K/V storage: [batch, kv_heads, prompt + window, head_dim]."""

    is_compileable = True
    is_sliding = False

    def __init__(self, cursor: _Cursor, num_slots: int):
        super().__init__()
        self.cursor = cursor
        self.num_slots = num_slots

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(b, h, self.num_slots, d)
        self.values = value_states.new_zeros(b, h, self.num_slots, value_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys.index_copy_(2, self.cursor.index, key_states)
        self.values.index_copy_(2, self.cursor.index, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.num_slots, 0

    def get_seq_length(self) -> int:
        return self.num_slots

    def get_max_length(self) -> int:
        return self.num_slots


class BoundedKVCache(Cache):
    """A transformers `Cache` with a pinned prompt region and a bounded thought window.

    Protocol per forward pass: `begin_prefill(prompt_valid)` once, then for each thought token
    `evict(step)` when `window.full`, and `admit(step)` before feeding it. The 4D boolean mask for
    the pass is `attention_mask` (transformers uses a 4D mask as-is).
    """

    def __init__(
        self,
        num_layers: int,
        prompt_valid: torch.Tensor,
        window: int,
        block: int,
        eviction_policy: EvictionPolicy | None = None,
    ):
        self.cursor = _Cursor()
        self.prompt_len = prompt_valid.shape[1]
        self.window = ThoughtWindow(window, block, eviction_policy)
        num_slots = self.prompt_len + window
        super().__init__(layers=[RingLayer(self.cursor, num_slots) for _ in range(num_layers)])
        self.prompt_valid = prompt_valid.bool()
        b, device = prompt_valid.shape[0], prompt_valid.device
        # decode mask, updated in place as slots fill and empty: [batch, 1, 1, slots]
        self.slot_valid = torch.zeros(b, 1, 1, num_slots, dtype=torch.bool, device=device)
        self.slot_valid[:, 0, 0, : self.prompt_len] = self.prompt_valid
        self._write = torch.zeros(1, dtype=torch.long, device=device)
        self.attention_mask: torch.Tensor | None = None

    @property
    def num_slots(self) -> int:
        return self.prompt_len + self.window.capacity

    def begin_prefill(self) -> torch.Tensor:
        """Point writes at the prompt slots; returns the prefill mask [B, 1, P, slots]: causal over
        real prompt tokens, each padding query sees only itself (no empty softmax rows)."""
        p, device = self.prompt_len, self.prompt_valid.device
        self.cursor.index = torch.arange(p, device=device)
        causal = torch.ones(p, p, dtype=torch.bool, device=device).tril()
        mask = causal[None] & self.prompt_valid[:, None, :]
        mask |= torch.eye(p, dtype=torch.bool, device=device)[None]
        pad = torch.zeros(mask.shape[0], p, self.window.capacity, dtype=torch.bool, device=device)
        self.attention_mask = torch.cat([mask, pad], dim=-1)[:, None]
        return self.attention_mask

    def evict(self, step: int) -> tuple[EvictionEvent, torch.Tensor]:
        """Evict a block before thought token `step`; returns the event and the freed slot
        indices (the caller reads their K/V for the encoder before they are overwritten)."""
        event, slots = self.window.evict(step)
        idx = torch.tensor([self.prompt_len + s for s in slots], device=self.slot_valid.device)
        self.slot_valid.index_fill_(3, idx, False)
        return event, idx

    def admit(self, step: int) -> torch.Tensor:
        """Reserve a slot for thought token `step` and make it visible; returns the decode mask."""
        slot = self.prompt_len + self.window.admit(step)
        self._write.fill_(slot)
        self.cursor.index = self._write
        self.slot_valid.index_fill_(3, self._write, True)
        self.attention_mask = self.slot_valid
        return self.slot_valid

    def gather(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of `slots` for every layer: two tensors [layers, batch, kv_heads, len(slots), head_dim]."""
        keys = torch.stack([layer.keys.index_select(2, slots) for layer in self.layers])
        values = torch.stack([layer.values.index_select(2, slots) for layer in self.layers])
        return keys, values

    def nbytes(self) -> int:
        """Bytes held by the K/V buffers (constant once allocated)."""
        return sum(
            t.numel() * t.element_size()
            for layer in self.layers
            if layer.is_initialized
            for t in (layer.keys, layer.values)
        )
