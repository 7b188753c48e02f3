"""Policy: the public face of the engine. Wrapping a model changes it in place; unwrap() must give
back a model that computes exactly what it did before."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_config
from thoughtfold.config import AdapterConfig, CacheConfig
from thoughtfold.engine.adapter import LowRankLinear
from thoughtfold.engine.attention import NAME
from thoughtfold.errors import ConfigError
from thoughtfold.policy import Policy

PROMPT = [[5, 17, 99, 3, 42]]


def _random_llama() -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config("llama"), dtype=torch.float32,
                                            attn_implementation="sdpa")


@pytest.mark.parametrize("mode", ["lora", "pte"])
def test_unwrap_gives_back_the_model_as_it_was(mode):
    model, fresh = _random_llama(), _random_llama()
    fresh.load_state_dict(model.state_dict())
    model.lm_head.weight.requires_grad_(False)  # a flag of the user's own that unwrap must keep
    policy = Policy(model, None, cache=CacheConfig(window=4),
                    adapter=AdapterConfig(mode=mode, rank=4, global_tokens=2))
    for w in policy.wrappers:
        torch.nn.init.normal_(w.lora_up, std=0.3)  # an adapter that changes the outputs
    result = policy.generate(PROMPT, max_new_tokens=12, temperature=0)
    assert result.evictions[0] > 0 and model.config._attn_implementation == NAME

    assert policy.unwrap() is model
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    assert [(n, p.requires_grad) for n, p in model.named_parameters()] == [
        (n, n != "lm_head.weight") for n, _ in fresh.named_parameters()]
    ids = torch.tensor(PROMPT)
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
        greedy = {"input_ids": ids, "max_new_tokens": 8, "do_sample": False, "pad_token_id": 256}
        assert torch.equal(model.generate(**greedy), fresh.generate(**greedy))
    with pytest.raises(ConfigError, match="unwrapped"):
        policy.generate(PROMPT, max_new_tokens=2)
    assert policy.unwrap() is model  # a second call changes nothing
