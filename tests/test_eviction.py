"""Eviction policies on hand-built attention statistics: each one evicts what its definition says;
the slot relocation that lets rows evict different tokens; the event record."""

from __future__ import annotations

import pytest
import torch

from thoughtfold import CacheConfig, ConfigError
from thoughtfold.engine.attention_stats import AttentionStats
from thoughtfold.engine.cache import _relocation
from thoughtfold.engine.eviction import (
    H2O,
    EvictionEvent,
    HeadKV,
    OldestBlock,
    SnapKV,
    head_weights_from_peaks,
)


def stats_with(total=None, recent=None) -> AttentionStats:
    """AttentionStats whose buffers are the given [L, B, H, W] totals / [L, k, B, H, W] recents."""
    shape = (total if total is not None else recent[:, 0]).shape
    stats = AttentionStats(shape[0], shape[1], shape[2], 0, shape[3], torch.device("cpu"),
                           cumulative=total is not None,
                           recent_queries=0 if recent is None else recent.shape[1])
    if total is not None:
        stats.total.copy_(total)
    if recent is not None:
        stats.recent.copy_(recent)
    return stats


def test_oldest_block_evicts_the_first_cached_tokens():
    assert OldestBlock().select([4, 5, 9, 12], 2) == [4, 5]
    assert OldestBlock().select((4, 5), 3) == [4, 5]


def test_h2o_evicts_least_attended_and_spares_the_newest():
    # one layer, two rows, two heads, window of 6 holding tokens 10..15 in scrambled slots
    slot_token = torch.tensor([[[12, 10, 15, 11, 14, 13], [10, 11, 12, 13, 14, 15]]])
    total = torch.tensor([[[[5, 1, 0, 9, 0, 3], [5, 1, 0, 9, 0, 3]],
                           [[0.1, 7, 8, 2, 0, 0], [0.1, 7, 8, 2, 0, 0]]]])
    chosen = H2O().select(stats_with(total=total), slot_token, step=16, block=2, protect=2)
    tokens = slot_token.gather(-1, chosen).sort(-1).values
    # row 0: scores by token 10:1 11:9 12:5 13:3 (14, 15 protected) -> evict 10 and 13
    # row 1: 10:0.1 11:7 12:8 13:2 -> evict 10 and 13
    assert tokens.tolist() == [[[10, 13], [10, 13]]]
    total[0, 1, :, 2] = 0.0  # token 12 of row 1 loses its attention: it goes instead of 13
    chosen = H2O().select(stats_with(total=total), slot_token, step=16, block=2, protect=2)
    assert slot_token.gather(-1, chosen).sort(-1).values[0, 1].tolist() == [10, 12]


def test_snapkv_pools_in_token_order_and_headkv_weights_heads():
    window, k = 9, 2
    slot_token = torch.tensor([[[4, 0, 8, 2, 6, 1, 5, 3, 7]]])  # token order differs from slot order
    per_token = torch.zeros(2, window)
    per_token[0, 2] = 10.0  # head 0 looks at token 2 only, head 1 at token 6 only (weaker)
    per_token[1, 6] = 1.0
    by_slot = per_token[:, slot_token[0, 0]]  # [H, W] in slot order
    recent = by_slot[None, None, None].expand(1, k, 1, 2, window) / k
    stats = stats_with(recent=recent.clone())
    evict = lambda policy, block: sorted(  # noqa: E731
        slot_token.gather(-1, policy.select(stats, slot_token, step=9, block=block, protect=0))[0, 0]
        .tolist())
    # pooling over 5 neighbours spreads token 2's score to tokens 0..4 and token 6's to 4..8
    kept_by_snapkv = set(range(9)) - set(evict(SnapKV(), 4))
    assert kept_by_snapkv == {0, 1, 2, 3, 4}
    # headkv: head 0 weighted out, so token 6's neighbourhood is what stays
    headkv = HeadKV(torch.tensor([[0.0, 1.0]]))
    assert set(range(9)) - set(evict(headkv, 4)) == {4, 5, 6, 7, 8}


def test_head_weights_have_mean_one_per_layer():
    w = head_weights_from_peaks(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
    assert torch.allclose(w, torch.tensor([[0.5, 1.5], [1.0, 1.0]]))


def test_attention_stats_record_softmax_attention_summed_over_query_groups():
    torch.manual_seed(0)
    query, key = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8)  # 4 query heads share 2 KV heads
    mask = torch.tensor([[True] * 5, [False, True, True, True, True]])[:, None, None]
    stats = AttentionStats(1, 2, 2, 1, 4, torch.device("cpu"), cumulative=True, recent_queries=3)
    stats.observe(0, query, key, mask, None)
    scores = query.reshape(2, 2, 2, 8) @ key.transpose(-1, -2) / 8**0.5
    weights = scores.masked_fill(~mask, -torch.inf).softmax(-1)
    expected = weights.sum(2)[..., 1:]  # the first slot is the prompt's: not tracked
    assert torch.allclose(stats.total[0], expected)
    assert torch.allclose(stats.recent[0, 0], expected) and stats.recent[0, 1:].abs().sum() == 0
    stats.admit(torch.tensor([2]))  # a new token in slot 2 starts with nothing; the next query writes row 1
    assert stats.total[0, ..., 2].abs().sum() == 0 and stats.recent[0, ..., 2].abs().sum() == 0
    stats.observe(0, query, key, mask, None)
    assert torch.allclose(stats.recent[0, 1], expected)


def test_relocation_frees_the_shared_slots_and_keeps_every_kept_token():
    gen = torch.Generator().manual_seed(0)
    capacity, block = 10, 3
    freed = torch.tensor([2, 3, 4])
    chosen = torch.stack([torch.stack([torch.randperm(capacity, generator=gen)[:block] for _ in range(4)])
                          for _ in range(2)])  # [L=2, B=4, E]
    content = torch.arange(capacity).expand(2, 4, capacity)
    moved = content.gather(-1, _relocation(chosen, freed, capacity))
    for layer in range(2):
        for row in range(4):
            kept = set(range(capacity)) - set(chosen[layer, row].tolist())
            outside = [moved[layer, row, s].item() for s in range(capacity) if s not in freed.tolist()]
            assert sorted(outside) == sorted(kept)  # every kept token sits outside the freed slots


def test_event_record_round_trips_with_per_layer_tokens():
    shared = EvictionEvent(8, (0, 1))
    scored = EvictionEvent(8, (), ((4, 5), (0, 7)))
    assert EvictionEvent.from_dict(shared.to_dict()) == shared
    assert EvictionEvent.from_dict(scored.to_dict()) == scored
    assert shared.by_layer(3) == [(0, 1)] * 3 and scored.by_layer(2) == [(4, 5), (0, 7)]
    with pytest.raises(ValueError, match="2 layers, the model 3"):
        scored.by_layer(3)


def test_cache_config_eviction_settings():
    assert CacheConfig(window=16, eviction="h2o").observed_queries == 6  # (16 - 4) // 2
    assert CacheConfig(window=128).observed_queries == 32
    assert CacheConfig(window=8, evict_ratio=1.0).protected == 0
    assert CacheConfig(window=64, observe_window=8).protected == 8
    with pytest.raises(ConfigError, match="eviction must be one of oldest, h2o, snapkv, headkv"):
        CacheConfig(window=8, eviction="lru")
    with pytest.raises(ConfigError, match="observe_window must be an integer >= 1"):
        CacheConfig(window=8, observe_window=0)
