"""The thought encoder: the online state is exact softmax attention over everything evicted so far
(with or without global tokens), and the paper-literal update keeps RMS-normalised rows."""

from __future__ import annotations

import math

import torch

from conftest import assert_close_to_scale
from thoughtfold import AdapterConfig
from thoughtfold.engine.encoder import ThoughtEncoder

L, B, D = 3, 2, 12


def direct_state(enc: ThoughtEncoder, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(Q (K W_K)^T / sqrt(d_a)) (V W_V) over globals + all blocks, computed in one shot."""
    gk = enc.global_keys[:, None].expand(L, B, -1, -1)
    gv = enc.global_values[:, None].expand(L, B, -1, -1)
    k = torch.cat([gk, keys], 2) @ enc.key_proj[:, None]
    v = torch.cat([gv, values], 2) @ enc.value_proj[:, None]
    scores = enc.queries[:, None] @ k.transpose(-1, -2) / math.sqrt(enc.attention_dim)
    return torch.softmax(scores, -1) @ v


def test_online_state_equals_direct_attention():
    torch.manual_seed(0)
    enc = ThoughtEncoder(L, D, AdapterConfig(mode="pte", rank=4, global_tokens=5, encoder_dim=6))
    blocks = [(torch.randn(L, B, n, D) * 3, torch.randn(L, B, n, D)) for n in (4, 7, 1, 5)]
    state = enc.initial_state(B)
    for k, (keys, values) in enumerate(blocks, start=1):
        state = enc.absorb(state, keys, values)
        all_k = torch.cat([b[0] for b in blocks[:k]], 2)
        all_v = torch.cat([b[1] for b in blocks[:k]], 2)
        assert_close_to_scale(state.read(), direct_state(enc, all_k, all_v), rel=1e-5)


def test_no_global_tokens_means_zero_state_until_first_eviction():
    enc = ThoughtEncoder(L, D, AdapterConfig(mode="pte", rank=4, global_tokens=0))
    assert enc.initial_state(B).read().abs().max() == 0
    state = enc.absorb(enc.initial_state(B), torch.randn(L, B, 3, D), torch.randn(L, B, 3, D))
    assert state.read().abs().max() > 0


def test_global_only_and_paper_update():
    keys, values = torch.randn(L, B, 3, D), torch.randn(L, B, 3, D)
    frozen = ThoughtEncoder(L, D, AdapterConfig(mode="pte", rank=4, global_tokens=2, global_only=True))
    s0 = frozen.initial_state(B)
    assert torch.equal(frozen.absorb(s0, keys, values).read(), s0.read())
    paper = ThoughtEncoder(L, D, AdapterConfig(mode="pte", rank=4, global_tokens=2, state_update="paper"))
    s = paper.absorb(paper.initial_state(B), keys, values).read()
    assert torch.allclose(s.pow(2).mean(-1), torch.ones(L, B, 4), atol=1e-4)  # RMS-normalised rows
