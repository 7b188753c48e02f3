"""Saved adapters: a save/load round trip gives the same rollouts, the PEFT export the same outputs,
a failed save leaves the previous adapter, loading onto the wrong model is a clear error, and the
saved settings apply unless others are given."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import adapted_policy, assert_close_to_scale, byte_tokenizer, make_tiny_model_dir
from thoughtfold.config import AdapterConfig, CacheConfig
from thoughtfold.errors import ConfigError
from thoughtfold.persist import adapter_settings
from thoughtfold.policy import Policy

PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 12]]


def test_adapter_settings_are_the_saved_ones_unless_given(tiny_dirs, tmp_path):
    adapter = AdapterConfig(mode="pte", rank=4, global_tokens=2)
    policy = Policy.from_pretrained(str(tiny_dirs["llama"]), cache=CacheConfig(window=6, evict_ratio=0.5),
                                    adapter=adapter, device="cpu")
    policy.save_adapter(str(tmp_path / "ad"))
    saved = adapter_settings(tmp_path / "ad")
    assert saved == (adapter, CacheConfig(window=6, evict_ratio=0.5), str(tiny_dirs["llama"]))
    assert adapter_settings(tmp_path / "ad", window=8)[1] == CacheConfig(window=8, evict_ratio=0.5)
    assert adapter_settings(tmp_path / "ad", evict_ratio=0.25)[1] == CacheConfig(window=6, evict_ratio=0.25)
    given = adapter_settings(tmp_path / "ad", model="other", cache=CacheConfig())
    assert given[1:] == (CacheConfig(), "other")
    with pytest.raises(ConfigError, match="not a thoughtfold adapter directory"):
        adapter_settings(tmp_path / "nope")
    loaded = Policy.from_pretrained(adapter_path=str(tmp_path / "ad"), cache=CacheConfig(window=4),
                                    device="cpu")
    assert (loaded.cache_config, loaded.adapter_config) == (CacheConfig(window=4), adapter)


@pytest.mark.parametrize("mode", ["lora", "pte"])
def test_save_load_round_trip(tiny_dirs, tmp_path, mode):
    p = adapted_policy(tiny_dirs, "qwen2", mode)
    torch.manual_seed(3)
    for t in p.trainable_parameters():
        t.data.normal_(0, 0.3)
    before = p.generate(PROMPTS, max_new_tokens=24, temperature=0)
    p.save_adapter(tmp_path / "ad")
    q = Policy.from_pretrained(adapter_path=str(tmp_path / "ad"), dtype="float32", device="cpu")
    assert q.cache_config == p.cache_config and q.adapter_config == p.adapter_config
    after = q.generate(PROMPTS, max_new_tokens=24, temperature=0)
    assert after.completion_ids == before.completion_ids
    assert after.logprobs == before.logprobs
    assert (tmp_path / "ad" / "peft").is_dir() == (mode == "lora")



def test_peft_export_reproduces_outputs(tiny_dirs, tmp_path):
    from peft import PeftModel

    p = adapted_policy(tiny_dirs, "llama", "lora", window=None)
    torch.manual_seed(4)
    for t in p.trainable_parameters():
        t.data.normal_(0, 0.3)
    p.save_adapter(tmp_path / "ad")
    base = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "ad" / "peft")).eval()
    ids = torch.tensor([PROMPTS[0] + [40, 41, 42, 43]])
    with torch.no_grad():
        ours, theirs = p.model(input_ids=ids).logits, peft_model(input_ids=ids).logits
    assert_close_to_scale(ours, theirs, rel=1e-5)
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=ids).logits
    assert (ours - plain).abs().max() > 1e-3  # the adapter really changes the outputs



def test_loading_onto_the_wrong_model_is_a_clear_error(tiny_dirs, tmp_path):
    adapted_policy(tiny_dirs, "llama", "lora").save_adapter(tmp_path / "ad")
    narrow = make_tiny_model_dir("llama", tmp_path / "narrow", hidden_size=32, intermediate_size=48)
    with pytest.raises(ConfigError, match="shape"):
        Policy.from_pretrained(model=str(narrow), adapter_path=str(tmp_path / "ad"), device="cpu")
    with pytest.raises(ConfigError, match="not a thoughtfold adapter"):
        Policy.from_pretrained(model=str(tiny_dirs["llama"]), adapter_path=str(tmp_path), device="cpu")



def test_failed_adapter_save_leaves_nothing_behind(tiny_dirs, tmp_path, monkeypatch):
    """A save that fails midway keeps the previous adapter and leaves no temporary directory."""
    import thoughtfold.persist as persist

    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"])
    policy = Policy(model, byte_tokenizer(), adapter=AdapterConfig(mode="pte", rank=4))
    policy.save_adapter(str(tmp_path / "adapter"))
    before = (tmp_path / "adapter" / persist.WEIGHTS_NAME).read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(persist, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        policy.save_adapter(str(tmp_path / "adapter"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    assert (tmp_path / "adapter" / persist.WEIGHTS_NAME).read_bytes() == before


def test_headkv_head_weights_travel_with_the_adapter(tiny_dirs, tmp_path):
    """A policy that calibrated its headkv head weights saves them; loading the adapter restores them
    (no recalibration on other prompts), so it evicts as the policy that saved it."""
    p = adapted_policy(tiny_dirs, "qwen2", "pte", window=6)
    p.cache_config = CacheConfig(window=6, eviction="headkv")
    before = p.generate(PROMPTS, max_new_tokens=20, temperature=0)  # calibrates on these prompts
    p.save_adapter(tmp_path / "ad")
    q = Policy.from_pretrained(adapter_path=str(tmp_path / "ad"), dtype="float32", device="cpu")
    assert torch.equal(q.head_weights, p.head_weights)
    after = q.generate(PROMPTS, max_new_tokens=20, temperature=0)
    assert after.completion_ids == before.completion_ids and after.eviction_log == before.eviction_log
    assert any(e.layers for log in after.eviction_log for e in log)  # scored choices were made
    # a full-cache window over a scored adapter evicts nothing: its eviction falls back to oldest
    assert adapter_settings(tmp_path / "ad", window=None)[1] == CacheConfig()
