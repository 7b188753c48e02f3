"""The grouped decode attention against transformers' own SDPA path: same outputs for one-token
decode under a per-sequence mask (the case it replaces), and untouched behaviour elsewhere."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from conftest import FAMILIES, assert_close_to_scale, byte_tokenizer
from thoughtfold import CacheConfig, ConfigError
from thoughtfold.engine.attention import NAME, grouped_decode_attention, use_grouped_decode
from thoughtfold.policy import Policy


class _Attn(torch.nn.Module):
    """What transformers' attention functions read from the module."""

    def __init__(self, groups: int):
        super().__init__()
        self.num_key_value_groups = groups
        self.is_causal = True


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 1), (6, 3)])
def test_grouped_decode_equals_repeated_kv(heads, kv_heads):
    """One query token per sequence, a [B, 1, 1, S] mask with holes: equal to SDPA over repeated K/V."""
    torch.manual_seed(0)
    b, s, d = 3, 11, 16
    q = torch.randn(b, heads, 1, d)
    k, v = torch.randn(b, kv_heads, s, d), torch.randn(b, kv_heads, s, d)
    mask = torch.rand(b, 1, 1, s) > 0.4
    mask[..., 0] = True
    module = _Attn(heads // kv_heads)
    ours, _ = grouped_decode_attention(module, q, k, v, mask, scaling=0.3)
    rep = heads // kv_heads
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1), attn_mask=mask, scale=0.3
    ).transpose(1, 2)
    assert ours.shape == (b, 1, heads, d)
    assert_close_to_scale(ours, ref, rel=1e-5)


def test_longer_queries_use_transformers_sdpa():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(2, 1, 5, 5)
    ours, _ = grouped_decode_attention(_Attn(2), q, k, v, mask, scaling=0.5)
    ref, _ = sdpa_attention_forward(_Attn(2), q, k, v, mask, scaling=0.5)
    assert torch.equal(ours, ref)


@pytest.mark.parametrize("family", FAMILIES)
def test_model_with_grouped_decode_matches_sdpa(tiny_dirs, family):
    """A model switched to the grouped path: same prefill logits and same greedy `generate` with a
    left-padded batch (HF builds its masks through the registered mask function)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32).eval()
    ids = torch.randint(0, 250, (3, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=256,
              eos_token_id=None, output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(**kw)
        use_grouped_decode(model)
        assert model.config._attn_implementation == NAME
        ours = model.generate(**kw)
    assert torch.equal(ours.sequences, ref.sequences)
    for a, b in zip(ours.logits, ref.logits, strict=True):
        assert_close_to_scale(a, b, rel=1e-5)


def test_other_attention_implementations_are_left_alone(tiny_dirs):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"], attn_implementation="eager")
    use_grouped_decode(model)
    assert model.config._attn_implementation == "eager"


def test_scored_eviction_needs_the_registered_attention(tiny_dirs):
    """A model on eager attention cannot report attention weights to a scored policy: one clear error."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], attn_implementation="eager").eval()
    policy = Policy(model, byte_tokenizer(), cache=CacheConfig(window=4, eviction="h2o"))
    with pytest.raises(ConfigError, match="load it with attn_implementation='sdpa'"):
        policy.generate([[5, 6, 7]], max_new_tokens=8)
