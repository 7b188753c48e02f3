"""Bounded KV cache (docs/design.md §1): the prompt is pinned, thought tokens live in a window of at most
W slots, and a full window evicts a block of ceil(rho*W) tokens at once.

Storage is preallocated (static shapes): one buffer per layer holding the P prompt slots followed by
the W window slots, used as a ring. Which thought token sits in which slot is host-side bookkeeping
(`ThoughtWindow`), so the decode step does no host sync; the device only sees the slot to write and
a validity mask. Positions are never stored: keys are cached already rotated at their true absolute
positions, exactly as the model's own cache does, so attention is order-free over the slots.

A scored eviction policy chooses different tokens per sequence and per layer. The slots the host
frees stay the ring's (the oldest block's slots), and on the device every (layer, sequence) moves
the tokens it keeps out of those slots into the slots of the tokens it evicts: one gather per layer
per event, after which the batch again shares one set of free slots and one validity mask.
"""

from __future__ import annotations

import bisect
import inspect

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention_stats import AttentionStats
from .eviction import EvictionEvent, EvictionPolicy, OldestBlock, ScoredEviction


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


def _relocation(chosen: torch.Tensor, freed: torch.Tensor, capacity: int) -> torch.Tensor:
    """The slot permutation that makes a per-(layer, sequence) choice free the shared slots `freed`:
    order [layers, batch, capacity] such that slot s takes the content of slot order[..., s]. A kept
    token sitting in a freed slot moves to a chosen slot outside `freed` (pairs in ascending order);
    every other slot keeps its content."""
    slots = torch.arange(capacity, device=chosen.device)
    in_freed = torch.zeros(capacity, dtype=torch.bool, device=chosen.device).index_fill_(0, freed, True)
    in_chosen = torch.zeros(*chosen.shape[:2], capacity, dtype=torch.bool, device=chosen.device)
    in_chosen.scatter_(-1, chosen, True)
    movers, holes = in_freed & ~in_chosen, in_chosen & ~in_freed
    movers_first = (slots + capacity * ~movers).argsort(-1)  # movers ascending, then the rest
    holes_first = (slots + capacity * ~holes).argsort(-1)
    pair = slots < movers.sum(-1, keepdim=True)
    order = slots.expand_as(in_chosen).clone()
    # hole i takes mover i; past the last pair, a non-hole slot is written with itself
    return order.scatter_(-1, holes_first, torch.where(pair, movers_first, holes_first))


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
        eviction_policy: EvictionPolicy | ScoredEviction | None = None,
        stats: AttentionStats | None = None,
        protect: int = 0,
    ):
        self.cursor = _Cursor()
        self.prompt_len = prompt_valid.shape[1]
        self.scored = eviction_policy if isinstance(eviction_policy, ScoredEviction) else None
        if self.scored is not None and stats is None:
            raise ValueError("a scored eviction policy needs the attention statistics of the rollout")
        self.stats, self.protect = stats, protect
        self.window = ThoughtWindow(window, block, None if self.scored else eviction_policy)
        num_slots = self.prompt_len + window
        super().__init__(layers=[RingLayer(self.cursor, num_slots) for _ in range(num_layers)])
        self.prompt_valid = prompt_valid.bool()
        b, device = prompt_valid.shape[0], prompt_valid.device
        # decode mask, updated in place as slots fill and empty: [batch, 1, 1, slots]
        self.slot_valid = torch.zeros(b, 1, 1, num_slots, dtype=torch.bool, device=device)
        self.slot_valid[:, 0, 0, : self.prompt_len] = self.prompt_valid
        self._write = torch.zeros(1, dtype=torch.long, device=device)
        self._write_window = torch.zeros(1, dtype=torch.long, device=device)
        self.attention_mask: torch.Tensor | None = None
        # under a scored policy: the thought token in each (layer, sequence, window slot)
        self.slot_token = None
        if self.scored is not None:
            self.slot_token = torch.full((num_layers, b, window), -1, dtype=torch.long, device=device)

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

    def evict_scored(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Evict before thought token `step` what the scored policy chooses per (layer, sequence);
        returns the evicted thought tokens [layers, batch, E] and their K/V [layers, batch,
        kv_heads, E, head_dim] (keys as cached, rotated)."""
        _, freed = self.window.evict(step)  # the ring's slots, freed for the whole batch
        chosen = self.scored.select(self.stats, self.slot_token, step, self.window.block, self.protect)
        tokens, ascending = self.slot_token.gather(-1, chosen).sort(-1)  # fold in token order, as the replay
        chosen = chosen.gather(-1, ascending)
        order = _relocation(chosen, torch.tensor(freed, device=chosen.device), self.window.capacity)
        p, keys, values = self.prompt_len, [], []
        for layer, pick, move in zip(self.layers, chosen, order, strict=True):
            for buffer, out in ((layer.keys, keys), (layer.values, values)):
                window = buffer[:, :, p:]
                shape = (*window.shape[:2], -1, window.shape[-1])
                out.append(window.gather(2, pick[:, None, :, None].expand(shape)))
                window.copy_(window.gather(2, move[:, None, :, None].expand(shape)))
        self.slot_token = self.slot_token.gather(-1, order)
        self.stats.permute(order)
        self.slot_valid.index_fill_(3, torch.tensor(freed, device=chosen.device) + p, False)
        return tokens, torch.stack(keys), torch.stack(values)

    def admit(self, step: int) -> torch.Tensor:
        """Reserve a slot for thought token `step` and make it visible; returns the decode mask."""
        slot = self.window.admit(step)
        if self.stats is not None:
            self._write_window.fill_(slot)
            self.stats.admit(self._write_window)
        if self.slot_token is not None:
            self.slot_token[:, :, slot] = step
        slot += self.prompt_len
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
