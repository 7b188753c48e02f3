"""Which cached thought tokens leave at an eviction event, and the record of each event. Its own
module because the choice is pluggable and the record is shared by the rollout that makes it and
the replay that follows it (docs/design.md §1.2).

Events happen at steps that are a pure function of W, rho and the sequence's own step (each
sequence's window fills on its own clock). Two kinds of policy choose what leaves:

* an `EvictionPolicy` chooses on the host, per sequence and for every layer (`oldest`, the paper's
  policy and the default, or any user policy);
* a `ScoredEviction` chooses per sequence and per layer from the attention statistics the decode
  step gathers (`h2o`, `snapkv`, `headkv`).

The rollout records the choice in the eviction log; the replay only reads the log, so every policy
replays exactly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch.nn import functional as F

from ..config import CacheConfig
from .attention_stats import AttentionStats

POOL_KERNEL = 5
"""SnapKV's smoothing: scores are averaged over this many neighbouring thought tokens, so a token
next to an important one tends to stay (it keeps the context of what is kept)."""


@dataclass(frozen=True)
class EvictionEvent:
    """One eviction: before thought token `step` was processed, thought tokens (indices into the
    completion, 0 = first generated token) left the cache. `tokens` when every layer evicted the same
    ones; `layers` (one tuple per layer, `tokens` then empty) when a scored policy chose per layer."""

    step: int
    tokens: tuple[int, ...]
    layers: tuple[tuple[int, ...], ...] | None = None

    def by_layer(self, num_layers: int) -> list[tuple[int, ...]]:
        """The evicted tokens of each layer."""
        if self.layers is None:
            return [self.tokens] * num_layers
        if len(self.layers) != num_layers:
            raise ValueError(f"eviction event at step {self.step} has {len(self.layers)} layers, "
                             f"the model {num_layers}")
        return list(self.layers)

    def to_dict(self) -> dict:
        if self.layers is None:
            return {"step": self.step, "tokens": list(self.tokens)}
        return {"step": self.step, "layers": [list(t) for t in self.layers]}

    @classmethod
    def from_dict(cls, d: dict) -> EvictionEvent:
        if "layers" in d:
            layers = tuple(tuple(int(t) for t in ts) for ts in d["layers"])
            return cls(step=int(d["step"]), tokens=(), layers=layers)
        return cls(step=int(d["step"]), tokens=tuple(int(t) for t in d["tokens"]))


def affects(step: int, length: int) -> bool:
    """Whether an event at `step` changes anything in a completion of `length` tokens: it happens
    before thought token `step` is fed, and the last token (index length - 1) is predicted from
    token length - 2, so only events with step <= length - 2 do. Later ones leave a log (rollouts
    of finished rows) or a schedule (the replay) without effect."""
    return step <= length - 2


def events_within(log: Sequence[EvictionEvent], length: int) -> list[EvictionEvent]:
    """The events of `log` that affect a completion of `length` tokens (see `affects`)."""
    return [e for e in log if affects(e.step, length)]


class EvictionPolicy(Protocol):
    """Chooses, on the host, which `block` of a sequence's cached thought tokens leave."""

    def select(self, cached: Sequence[int], block: int) -> list[int]: ...


class OldestBlock:
    """The paper's policy: evict the `block` oldest thought tokens."""

    def select(self, cached: Sequence[int], block: int) -> list[int]:
        return list(cached[:block])


class ScoredEviction:
    """Evicts, per sequence and per layer, the `block` cached thought tokens with the lowest score;
    the newest `protect` thought tokens never leave (H2O's recent window, SnapKV's observation
    window). Subclasses say which statistics they need and how they score."""

    name = "scored"
    cumulative = False  # needs AttentionStats.total
    recent = False  # needs AttentionStats.recent

    def scores(self, stats: AttentionStats, slot_token: torch.Tensor) -> torch.Tensor:
        """[layers, batch, window] scores of the cached slots (higher = keep)."""
        raise NotImplementedError

    def select(self, stats: AttentionStats, slot_token: torch.Tensor, step: int | torch.Tensor, block: int,
               protect: int) -> torch.Tensor:
        """Window slots to evict [layers, batch, block]; `slot_token` [layers, batch, window] is the
        thought token in each slot, `step` the thought token about to be admitted (one per sequence
        [batch], or one for all). Runs on the device, without a host sync."""
        scores = self.scores(stats, slot_token).float()
        step = torch.as_tensor(step, device=slot_token.device).reshape(1, -1, 1)
        scores = scores.masked_fill(slot_token >= step - protect, float("inf"))
        return scores.topk(block, dim=-1, largest=False).indices


class H2O(ScoredEviction):
    """Heavy hitters (H2O): a token's score is all the attention it has received since it arrived,
    summed over the layer's heads."""

    name = "h2o"
    cumulative = True

    def scores(self, stats: AttentionStats, slot_token: torch.Tensor) -> torch.Tensor:
        return stats.total.sum(2)


class SnapKV(ScoredEviction):
    """SnapKV: a token's score is the attention it received from the last `observe_window` queries,
    smoothed over neighbouring tokens (average pooling in token order), summed over the layer's KV
    heads with `head_weights` [layers, kv_heads] (uniform here)."""

    name = "snapkv"
    recent = True

    def __init__(self, head_weights: torch.Tensor | None = None):
        self.head_weights = head_weights

    def scores(self, stats: AttentionStats, slot_token: torch.Tensor) -> torch.Tensor:
        per_head = stats.recent.sum(1)  # [L, B, H_kv, W]
        order = slot_token.argsort(-1)[:, :, None].expand_as(per_head)
        in_order = per_head.gather(-1, order)
        pooled = F.avg_pool1d(in_order.flatten(0, 2)[:, None], POOL_KERNEL, stride=1,
                              padding=POOL_KERNEL // 2,
                              count_include_pad=False).view_as(in_order)
        per_head = torch.empty_like(per_head).scatter_(-1, order, pooled)
        if self.head_weights is None:
            return per_head.sum(2)
        return (per_head * self.head_weights.to(per_head)[:, None, :, None]).sum(2)


class HeadKV(SnapKV):
    """Head-aware SnapKV in HeadKV's spirit: each KV head's SnapKV score is weighted by the head's
    importance, measured once by a calibration pass (`Policy.calibrate_heads`: how sharply the head
    attends to single past thought tokens, its "retrieval" behaviour). HeadKV also gives important
    heads a larger share of the budget; here the heads of a layer share one set of slots (the
    encoder reads a token across all heads), so the weights rank tokens and do not move budget."""

    name = "headkv"

    def __init__(self, head_weights: torch.Tensor):
        super().__init__(head_weights)


def head_weights_from_peaks(peak: torch.Tensor) -> torch.Tensor:
    """Calibration statistic [layers, kv_heads] -> weights with mean 1 in every layer."""
    return peak / peak.mean(-1, keepdim=True).clamp_min(1e-12)


def eviction_policy_for(cache: CacheConfig, head_weights: torch.Tensor | None = None
                        ) -> EvictionPolicy | ScoredEviction:
    """The policy `cache.eviction` names (`headkv` needs the calibrated `head_weights`)."""
    if cache.eviction == "h2o":
        return H2O()
    if cache.eviction == "snapkv":
        return SnapKV()
    if cache.eviction == "headkv":
        if head_weights is None:
            raise ValueError("headkv needs head weights: calibrate them with Policy.calibrate_heads")
        return HeadKV(head_weights)
    return OldestBlock()
