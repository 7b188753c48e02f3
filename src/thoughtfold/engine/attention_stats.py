"""What a scored eviction policy reads (docs/design.md §1.2): for every layer, sequence, KV head and
cached thought slot, the attention that slot received from the decode queries.

The statistics are gathered inside the decode step by the attention function (attention.py), with
in-place updates of preallocated buffers and no host sync, so the CUDA-graph and compiled decode
paths keep working. Only thought slots are tracked: the prompt is pinned and never a candidate.
"""

from __future__ import annotations

import copy

import torch

STATS_ATTR = "thoughtfold_stats"
"""Attribute under which an attention module finds the statistics of the running rollout."""


class AttentionStats:
    """Per-slot attention received, [layers, batch, kv_heads, window], in up to three forms:

    * `total`: summed over every query since the slot's token arrived (H2O's accumulated attention);
    * `recent`: the last `recent_queries` queries, one row each in a ring (SnapKV's observation window);
    * `peak`: per layer and KV head, the summed largest weight a query puts on one thought slot (the
      head-importance calibration).

    A KV head's statistic sums the attention of the query heads that share it (grouped-query models).
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, prompt_slots: int, window: int,
                 device: torch.device, cumulative: bool = False, recent_queries: int = 0, peak: bool = False):
        self.prompt_slots = prompt_slots
        shape = (num_layers, batch, kv_heads, window)
        self.total = torch.zeros(shape, device=device) if cumulative else None
        recent = (num_layers, recent_queries, *shape[1:])
        self.recent = torch.zeros(recent, device=device) if recent_queries else None
        self.peak = torch.zeros(num_layers, kv_heads, device=device) if peak else None
        # per sequence, the `recent` row its next query writes (each sequence keeps its own clock)
        self._row = torch.zeros(batch, dtype=torch.long, device=device)
        self._batch = torch.arange(batch, device=device)

    def observe(self, layer: int, query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor,
                scaling: float | None) -> None:
        """Record one decode step of one layer: query [B, H, 1, D], key [B, H_kv, S, D] (rotated, as
        attended), mask [B, 1, 1, S] (True = visible)."""
        batch, heads, _, dim = query.shape
        kv_heads = key.shape[1]
        grouped = query.reshape(batch, kv_heads, heads // kv_heads, dim).float()
        logits = grouped @ key.float().transpose(-1, -2) * (dim**-0.5 if scaling is None else scaling)
        probs = logits.masked_fill(~mask, float("-inf")).softmax(-1)  # [B, H_kv, group, S]
        thought = probs[..., self.prompt_slots:]
        if self.total is not None:
            self.total[layer].add_(thought.sum(2))
        if self.recent is not None:
            self.recent[layer].index_put_((self._row, self._batch), thought.sum(2))
        if self.peak is not None and thought.shape[-1]:
            self.peak[layer].add_(thought.amax(-1).sum((0, 2)))

    def admit(self, slot: torch.Tensor) -> None:
        """Each sequence's new token takes its window slot `slot` [batch] (a device tensor; [1]: the same
        slot for all): it starts with no attention received, and the next query writes the next
        `recent` row."""
        slot = slot.expand(self._row.shape[0])
        if self.total is not None:
            self.total.scatter_(-1, slot[None, :, None, None].expand(*self.total.shape[:3], 1), 0.0)
        if self.recent is not None:
            self.recent.scatter_(-1, slot[None, None, :, None, None].expand(*self.recent.shape[:4], 1), 0.0)
            self._row.add_(1).remainder_(self.recent.shape[1])

    def reset(self, rows: torch.Tensor) -> None:
        """Sequences `rows` start afresh (a slot handed to a new prompt): nothing observed yet."""
        if self.total is not None:
            self.total.index_fill_(1, rows, 0.0)
        if self.recent is not None:
            self.recent.index_fill_(2, rows, 0.0)
        self._row.index_fill_(0, rows, 0)

    def rows(self, rows: torch.Tensor) -> AttentionStats:
        """The statistics of sequences `rows` only (a copy): what a scored policy reads at their event."""
        sub = copy.copy(self)
        sub.total = None if self.total is None else self.total.index_select(1, rows)
        sub.recent = None if self.recent is None else self.recent.index_select(2, rows)
        return sub

    def permute(self, order: torch.Tensor, rows: torch.Tensor) -> None:
        """Move every slot's statistics with its token: in sequence rows[i], slot s now holds what slot
        order[l, i, s] held. In place: a captured decode graph keeps writing to these buffers."""
        if self.total is not None:
            mine = self.total.index_select(1, rows)
            self.total.index_copy_(1, rows, mine.gather(-1, order[:, :, None].expand_as(mine)))
        if self.recent is not None:
            mine = self.recent.index_select(2, rows)
            self.recent.index_copy_(2, rows, mine.gather(-1, order[:, None, :, None].expand_as(mine)))
