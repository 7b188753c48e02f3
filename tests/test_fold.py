"""Folding evicted K/V into the encoder state: keys are de-rotated first, so the state does not
depend on the positions the evicted tokens sat at."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from conftest import assert_close_to_scale
from thoughtfold import AdapterConfig
from thoughtfold.engine.encoder import ThoughtEncoder
from thoughtfold.engine.fold import StateFolder


def test_state_is_position_free(tiny_dirs):
    """The same content evicted at different positions gives the same state (keys are de-rotated)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen3"], dtype=torch.float32)
    cfg = model.config
    enc = ThoughtEncoder(cfg.num_hidden_layers, cfg.num_key_value_heads * cfg.head_dim,
                         AdapterConfig(mode="pte", rank=4, global_tokens=2))
    folder = StateFolder(model, [], enc)
    torch.manual_seed(1)
    raw_k = torch.randn(cfg.num_hidden_layers, 1, cfg.num_key_value_heads, 5, cfg.head_dim)
    values = torch.randn_like(raw_k)
    states = []
    for start in (0, 37, 300):
        pos = torch.arange(start, start + 5)[None]
        cos, sin = model.model.rotary_emb(raw_k, pos)
        rotated, _ = apply_rotary_pos_emb(raw_k, raw_k, cos, sin)
        states.append(folder.fold(enc.initial_state(1), rotated, values, pos).read())
    assert_close_to_scale(states[1], states[0], rel=1e-5)
    assert_close_to_scale(states[2], states[0], rel=1e-5)
