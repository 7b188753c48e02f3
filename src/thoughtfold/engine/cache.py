"""Bounded KV cache (docs/design.md §1.1-1.2): per sequence the prompt is pinned, thought tokens live in
a window of at most W slots, and a full window evicts a block of ceil(rho*W) tokens at once.

The batch is a fixed number of rows ("slots"), each decoding one sequence on its own clock, so a row
can be handed to a new prompt while the others go on (continuous batching). Storage is preallocated
(static shapes): one buffer per layer holding, per row, the P prompt slots followed by the W window
slots, used as a ring: thought token t of a sequence is written to window slot t mod W. Each row's
clock, prompt length and validity mask live on the device, so the decode step does no host sync.
Positions are never stored: keys are cached already rotated at their true absolute positions, exactly
as the model's own cache does, so attention is order-free over the slots.

An eviction frees the ring's slots (those of the oldest block). A policy that evicts other tokens (a
scored policy, per sequence and layer; a custom host policy, per sequence) first moves, in every
(layer, sequence), the tokens it keeps out of those slots into the slots of the tokens it evicts: one
gather per layer per event, after which the ring's order holds again.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .attention_stats import AttentionStats
from .eviction import EvictionPolicy, OldestBlock, ScoredEviction


def _relocation(chosen: torch.Tensor, freed: torch.Tensor, capacity: int) -> torch.Tensor:
    """The slot permutation that makes a per-(layer, sequence) choice free the slots `freed` ([E] for
    every sequence, or [batch, E]): order [layers, batch, capacity] such that slot s takes the content
    of slot order[..., s]. A kept token sitting in a freed slot moves to a chosen slot outside `freed`
    (pairs in ascending order); every other slot keeps its content."""
    slots = torch.arange(capacity, device=chosen.device)
    in_freed = torch.zeros(chosen.shape[1], capacity, dtype=torch.bool, device=chosen.device)
    in_freed.scatter_(-1, freed.expand(chosen.shape[1], -1), True)
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
    """Where the current forward pass writes, shared by all layers: during a prefill the prompt regions
    of rows `rows` (row rows[i] taking prefill sequence source[i]), else each row's slot `index` [B]."""

    def __init__(self) -> None:
        self.rows: torch.Tensor | None = None
        self.source: torch.Tensor | None = None
        self.index: torch.Tensor | None = None


class RingLayer(CacheLayerMixin):
    """One layer's preallocated K/V storage: [batch, kv_heads, prompt + window, head_dim]."""

    is_compileable = True
    is_sliding = False

    def __init__(self, cursor: _Cursor, batch: int, num_slots: int, prompt_slots: int):
        super().__init__()
        self.cursor = cursor
        self.batch, self.num_slots, self.prompt_slots = batch, num_slots, prompt_slots

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        _, h, _, d = key_states.shape
        self.keys = key_states.new_zeros(self.batch, h, self.num_slots, d)
        self.values = value_states.new_zeros(self.batch, h, self.num_slots, value_states.shape[-1])
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        cursor = self.cursor
        if cursor.rows is not None:  # a prefill attends to its own prompt tokens only
            for buffer, new in ((self.keys, key_states), (self.values, value_states)):
                prompt = buffer[:, :, : self.prompt_slots]
                prompt.index_copy_(0, cursor.rows, new.index_select(0, cursor.source))
            return key_states, value_states
        index = cursor.index[:, None, None, None].expand(*key_states.shape[:2], 1, key_states.shape[-1])
        self.keys.scatter_(2, index, key_states)
        self.values.scatter_(2, index, value_states)
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.num_slots, 0

    def get_seq_length(self) -> int:
        return self.num_slots

    def get_max_length(self) -> int:
        return self.num_slots


@dataclass
class Evicted:
    """What one eviction step took from sequences `rows`: thought tokens [layers, n, E] (ascending),
    their K/V [layers, n, kv_heads, E, head_dim] (keys as cached, rotated; None when not gathered),
    the keys' positions ([n, E] when every layer evicted the same tokens, else [layers, n, E]), and the
    tokens as host tuples when a host-side choice made them known (None under a scored policy)."""

    tokens: torch.Tensor
    keys: torch.Tensor | None
    values: torch.Tensor | None
    positions: torch.Tensor
    listed: list[tuple[int, ...]] | None


class BoundedKVCache(Cache):
    """A transformers `Cache` of `batch` rows, each a pinned prompt region of `prompt_slots` and a
    bounded thought window of `window` slots.

    Protocol: `prefill(rows, source, valid)` hands rows to new prompts (the forward pass that follows
    writes their prompt K/V); then per decode step, `evict(rows, steps)` for the sequences whose window
    is full, and `admit()` before feeding one thought token per row. The 4D boolean mask for the pass
    is `attention_mask` (transformers uses a 4D mask as-is).
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        prompt_slots: int,
        window: int,
        block: int,
        device: torch.device,
        eviction_policy: EvictionPolicy | ScoredEviction | None = None,
        stats: AttentionStats | None = None,
        protect: int = 0,
    ):
        self.cursor = _Cursor()
        self.prompt_slots, self.capacity, self.block = prompt_slots, window, block
        self.scored = eviction_policy if isinstance(eviction_policy, ScoredEviction) else None
        if self.scored is not None and stats is None:
            raise ValueError("a scored eviction policy needs the attention statistics of the rollout")
        ring = self.scored is None and type(eviction_policy) in (type(None), OldestBlock)
        self.host_policy = None if ring or self.scored is not None else eviction_policy
        self.stats, self.protect = stats, protect
        num_slots = prompt_slots + window
        layers = [RingLayer(self.cursor, batch, num_slots, prompt_slots) for _ in range(num_layers)]
        super().__init__(layers=layers)
        # decode mask, updated in place as slots fill and empty: [batch, 1, 1, slots]
        self.slot_valid = torch.zeros(batch, 1, 1, num_slots, dtype=torch.bool, device=device)
        self.clock = torch.zeros(batch, dtype=torch.long, device=device)  # thought tokens each row has fed
        self.prompt_len = torch.zeros(batch, dtype=torch.long, device=device)
        self._write = torch.zeros(batch, dtype=torch.long, device=device)  # each row's slot in this step
        self.attention_mask: torch.Tensor | None = None
        # unless the ring is the policy: the thought token in each (layer, row, window slot)
        self.slot_token = None if ring else torch.full((num_layers, batch, window), -1, dtype=torch.long,
                                                       device=device)
        # a host policy's view of each row: the tokens kept at its last event, the first token fed since
        self._held: list[tuple[list[int], int]] = [([], 0)] * batch

    @property
    def num_slots(self) -> int:
        return self.prompt_slots + self.capacity

    def prefill(self, rows: list[int], source: list[int], valid: torch.Tensor) -> torch.Tensor:
        """Hand rows `rows` to new prompts: the next forward pass is the prefill of the left-padded
        prompts `valid` [n, prompt_slots], row rows[i] taking prompt source[i] (identical prompts share
        one). Their windows, clocks and attention statistics start empty. Returns the prefill mask
        [n, 1, P, P]: causal over real prompt tokens, a padding query sees only itself."""
        p, device = self.prompt_slots, valid.device
        idx, src = torch.tensor(rows, device=device), torch.tensor(source, device=device)
        self.cursor.rows, self.cursor.source = idx, src
        mine = valid.index_select(0, src)
        window = mine.new_zeros(len(rows), self.capacity)
        self.slot_valid.view(-1, self.num_slots).index_copy_(0, idx, torch.cat([mine, window], 1))
        self.clock.index_fill_(0, idx, 0)
        self.prompt_len.index_copy_(0, idx, mine.sum(-1))
        if self.slot_token is not None:
            self.slot_token.index_fill_(1, idx, -1)
        if self.stats is not None:
            self.stats.reset(idx)
        for row in rows:
            self._held[row] = ([], 0)
        causal = torch.ones(p, p, dtype=torch.bool, device=device).tril()
        mask = causal[None] & valid[:, None, :]
        mask |= torch.eye(p, dtype=torch.bool, device=device)[None]
        self.attention_mask = mask[:, None]
        return self.attention_mask

    def admit(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Give every row's next thought token its slot (window slot clock mod W) and make it visible;
        returns the tokens' positions [B] and the decode mask. Advances every clock."""
        window_slot = self.clock % self.capacity
        if self.stats is not None:
            self.stats.admit(window_slot)
        if self.slot_token is not None:
            index = window_slot[None, :, None].expand(self.slot_token.shape[0], -1, 1)
            self.slot_token.scatter_(-1, index, self.clock[None, :, None].expand_as(index))
        self._write.copy_(window_slot + self.prompt_slots)
        self.cursor.rows, self.cursor.index = None, self._write
        self.slot_valid.scatter_(3, self._write[:, None, None, None], True)
        positions = self.prompt_len + self.clock
        self.clock.add_(1)
        self.attention_mask = self.slot_valid
        return positions, self.slot_valid

    def evict(self, rows: list[int], steps: list[int], gather: bool = True) -> Evicted:
        """Evict a block from the sequence in each row of `rows`, whose window is full before it feeds
        thought token steps[i]; `gather`: also return the evicted K/V (for the encoder)."""
        device = self.clock.device
        idx, step = torch.tensor(rows, device=device), torch.tensor(steps, device=device)
        block = torch.arange(self.block, device=device)
        ring = (step[:, None] + block) % self.capacity  # the oldest block's slots
        listed = None
        if self.slot_token is None:  # the ring is the policy
            chosen = ring.expand(len(self.layers), -1, -1)
            tokens = (step[:, None] - self.capacity + block).expand_as(chosen)
            listed = [tuple(range(t - self.capacity, t - self.capacity + self.block)) for t in steps]
        else:
            if self.scored is not None:
                chosen = self.scored.select(self.stats.rows(idx), self.slot_token.index_select(1, idx), step,
                                            self.block, self.protect)
            else:
                listed = self._host_choice(rows, steps)
                wanted = torch.tensor(listed, device=device)
                mine = self.slot_token.index_select(1, idx)
                chosen = (mine[..., None] == wanted[None, :, None, :]).int().argmax(2)
            tokens, ascending = self.slot_token.index_select(1, idx).gather(-1, chosen).sort(-1)
            chosen = chosen.gather(-1, ascending)
        keys, values = self._take(idx, chosen) if gather else (None, None)
        if self.slot_token is not None:
            self._relocate(idx, _relocation(chosen, ring, self.capacity))
        self.slot_valid.view(-1, self.num_slots)[idx[:, None], ring + self.prompt_slots] = False
        plen = self.prompt_len.index_select(0, idx)
        positions = plen[:, None] + tokens[0] if listed is not None else plen[None, :, None] + tokens
        return Evicted(tokens, keys, values, positions, listed)

    def _host_choice(self, rows: list[int], steps: list[int]) -> list[tuple[int, ...]]:
        """Ask the host policy, per sequence, which `block` of its cached thought tokens leave."""
        out = []
        for row, step in zip(rows, steps, strict=True):
            kept, since = self._held[row]
            cached = kept + list(range(since, step))
            chosen = sorted(self.host_policy.select(cached, self.block))
            if len(set(chosen)) != self.block or not set(chosen) <= set(cached):
                raise RuntimeError(f"eviction policy returned {chosen}: it must choose {self.block} of the "
                                   f"cached thought tokens {cached}")
            gone = set(chosen)
            self._held[row] = ([t for t in cached if t not in gone], step)
            out.append(tuple(chosen))
        return out

    def _take(self, idx: torch.Tensor, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of window slots `chosen` [layers, n, E] of rows `idx`: [layers, n, kv_heads, E, head_dim]."""
        pairs = list(zip(self.layers, chosen + self.prompt_slots, strict=True))
        keys = [layer.keys[idx[:, None], :, pick].transpose(1, 2) for layer, pick in pairs]
        values = [layer.values[idx[:, None], :, pick].transpose(1, 2) for layer, pick in pairs]
        return torch.stack(keys), torch.stack(values)

    def _relocate(self, idx: torch.Tensor, order: torch.Tensor) -> None:
        """In rows `idx`, window slot s of layer l takes the content of slot order[l, i, s] (K/V, the
        token map and the attention statistics move together)."""
        p = self.prompt_slots
        for layer, move in zip(self.layers, order, strict=True):
            for buffer in (layer.keys, layer.values):
                window = buffer.index_select(0, idx)[:, :, p:]
                moved = window.gather(2, move[:, None, :, None].expand_as(window))
                buffer[:, :, p:].index_copy_(0, idx, moved)
        self.slot_token.index_copy_(1, idx, self.slot_token.index_select(1, idx).gather(-1, order))
        if self.stats is not None:
            self.stats.permute(order, idx)

    def nbytes(self) -> int:
        """Bytes held by the K/V buffers (constant once allocated)."""
        return sum(
            t.numel() * t.element_size()
            for layer in self.layers
            if layer.is_initialized
            for t in (layer.keys, layer.values)
        )
