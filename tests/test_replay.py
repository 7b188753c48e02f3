"""The central correctness test: replay log-probs equal the rollout's sampling log-probs, in every
mode, across eviction events; plus the gradient semantics of truncated and full backprop."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, byte_tokenizer
from thoughtfold import AdapterConfig, CacheConfig
from thoughtfold.policy import Policy
from thoughtfold.replay import default_schedule

PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 12], [200, 31, 64, 9]]


def make_policy(tiny_dirs, family, mode, window=8, ratio=0.25, **adapter):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32).eval()
    cfg = AdapterConfig(mode=mode, rank=4, alpha=8, global_tokens=adapter.pop("global_tokens", 3), **adapter)
    policy = Policy(model, byte_tokenizer(), cache=CacheConfig(window=window, evict_ratio=ratio), adapter=cfg)
    torch.manual_seed(7)
    for w in policy.wrappers:  # non-zero adapters, so that the state actually changes the outputs
        torch.nn.init.normal_(w.lora_up, std=0.3)
    return policy


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["none", "lora", "pte"])
def test_replay_equals_rollout_logprobs(tiny_dirs, family, mode):
    policy = make_policy(tiny_dirs, family, mode)
    res = policy.generate(PROMPTS, max_new_tokens=40, temperature=1.0, seed=5)
    assert res.stats["evictions"] >= 4
    replayed = policy.replay_logprobs(res.prompt_ids, res.completion_ids, res.eviction_log)
    for ours, ref in zip(replayed, res.logprobs, strict=True):
        assert (ours - torch.tensor(ref)).abs().max().item() <= 1e-4


def test_replay_with_default_schedule_and_variable_lengths(tiny_dirs):
    policy = make_policy(tiny_dirs, "llama", "pte", window=6, ratio=0.5)
    policy.model.generation_config.eos_token_id = [256, 65, 66, 67]
    res = policy.generate(PROMPTS, max_new_tokens=30, temperature=1.5, seed=11)
    for c, log in zip(res.completion_ids, res.eviction_log, strict=True):
        assert log == default_schedule(len(c), policy.cache_config)
    replayed = policy.replay_logprobs(res.prompt_ids, res.completion_ids, temperature=1.5)  # schedule derived
    for ours, ref in zip(replayed, res.logprobs, strict=True):
        assert (ours - torch.tensor(ref)).abs().max().item() <= 1e-4


def test_pte_state_changes_outputs_after_eviction(tiny_dirs):
    """Sanity: with non-zero adapters the folded state matters, so the equality above is not vacuous."""
    policy = make_policy(tiny_dirs, "qwen2", "pte")
    res = policy.generate(PROMPTS[:1], max_new_tokens=30, temperature=0)
    base = make_policy(tiny_dirs, "qwen2", "lora")
    ref = base.replay_logprobs(res.prompt_ids, res.completion_ids, res.eviction_log)[0]
    assert (ref - torch.tensor(res.logprobs[0])).abs().max() > 1e-3
