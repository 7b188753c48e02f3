"""The decode step captured as a CUDA graph against eager decoding (skipped without CUDA), and the
pieces that make capture possible: a pinned adapter state updated in place."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, assert_close_to_scale, byte_tokenizer, end_at_different_steps
from thoughtfold import AdapterConfig, CacheConfig, ConfigError
from thoughtfold.engine.cache import BoundedKVCache
from thoughtfold.engine.graph import DecodeStep
from thoughtfold.policy import Policy

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 12], [200, 31, 64, 9]]


def make_policy(tiny_dirs, family, mode, device, dtype=torch.float32, cuda_graph=None, eviction="oldest"):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=dtype).to(device).eval()
    torch.manual_seed(3)  # the same encoder and adapter weights for every policy of a test
    policy = Policy(model, byte_tokenizer(), cache=CacheConfig(window=6, evict_ratio=0.5, eviction=eviction),
                    adapter=AdapterConfig(mode=mode, rank=4, global_tokens=2), cuda_graph=cuda_graph)
    with torch.no_grad():  # a trained-looking adapter, so the state visibly changes the logits
        for w in policy.wrappers:
            w.lora_up.normal_(0, 0.5)
    return policy


def test_capture_needs_cuda(tiny_dirs):
    with pytest.raises(ConfigError, match="CUDA device"):
        make_policy(tiny_dirs, "qwen2", "none", "cpu", cuda_graph=True)
    cache = BoundedKVCache(2, 1, 3, window=4, block=1, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA"):
        DecodeStep(torch.nn.Linear(1, 1), cache, capture=True)


def test_cpu_policies_decode_eagerly(tiny_dirs):
    assert make_policy(tiny_dirs, "qwen2", "none", "cpu").cuda_graph is False


def test_pinned_state_is_updated_in_place(tiny_dirs):
    policy = make_policy(tiny_dirs, "llama", "pte", "cpu")
    folder = policy.folder
    state = folder.start(2)
    folder.pin(state)
    held = [w.state for w in policy.wrappers]
    keys = torch.randn(2, 2, 2, 3, 16)  # [layers, batch, kv_heads, E, head_dim]
    new = folder.fold(state, keys, keys, torch.tensor([[4, 5, 6], [7, 8, 9]]))
    for w, before in zip(policy.wrappers, held, strict=True):
        assert w.state is before  # same storage: what a captured graph reads
        torch.testing.assert_close(w.state, new.read()[w.layer])
    assert not torch.allclose(new.read(), state.read())
    folder.apply(None)
    assert all(w.state is None for w in policy.wrappers)


@cuda
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["none", "pte"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("eviction", ["oldest", "snapkv"])
def test_captured_decode_equals_eager(tiny_dirs, family, mode, dtype, eviction):
    """Same tokens, log-probs and eviction choices with the graph as eagerly, across eviction events
    (and PTE state updates), with greedy and with seeded sampling."""
    eager = make_policy(tiny_dirs, family, mode, "cuda", dtype, cuda_graph=False, eviction=eviction)
    graph = make_policy(tiny_dirs, family, mode, "cuda", dtype, cuda_graph=True, eviction=eviction)
    for kw in (dict(temperature=0), dict(temperature=1.0, top_p=0.9, seed=7)):
        a = eager.generate(PROMPTS, max_new_tokens=40, **kw)
        b = graph.generate(PROMPTS, max_new_tokens=40, **kw)
        assert a.stats["evictions"] > 3
        assert a.completion_ids == b.completion_ids and a.eviction_log == b.eviction_log
        for x, y in zip(a.logprobs, b.logprobs, strict=True):
            assert_close_to_scale(y, x, rel=1e-5)


@cuda
@pytest.mark.parametrize("eviction", ["oldest", "snapkv"])
def test_captured_decode_with_continuous_batching_equals_eager(tiny_dirs, eviction):
    """One graph of 2 slots, captured once, serves sequences admitted at different steps (each
    admission resets its slot's window, state and statistics in place): the same tokens, eviction
    logs and log-probs as eager decoding."""
    eager = make_policy(tiny_dirs, "qwen2", "pte", "cuda", cuda_graph=False, eviction=eviction)
    graph = make_policy(tiny_dirs, "qwen2", "pte", "cuda", cuda_graph=True, eviction=eviction)
    prompts = PROMPTS * 2
    end_at_different_steps(eager, prompts, 40, temperature=1.0, seed=7)
    graph.model.generation_config.eos_token_id = eager.model.generation_config.eos_token_id
    a = eager.generate(prompts, max_new_tokens=40, temperature=1.0, seed=7, slots=2)
    b = graph.generate(prompts, max_new_tokens=40, temperature=1.0, seed=7, slots=2)
    assert a.stats["prefills"] > 1 and a.stats["evictions"] > 3
    assert a.completion_ids == b.completion_ids and a.eviction_log == b.eviction_log
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        assert_close_to_scale(y, x, rel=1e-5)


@pytest.mark.parametrize(("mode", "eviction"), [("none", "oldest"), ("pte", "oldest"), ("pte", "h2o")])
def test_compiled_decode_equals_eager(tiny_dirs, mode, eviction):
    """torch.compile'd decode steps give the eager tokens (and log-probs to fp32 rounding); under a
    scored policy the compiled step gathers the same attention statistics (same choices)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    eager = make_policy(tiny_dirs, "qwen2", mode, device, cuda_graph=False, eviction=eviction)
    compiled = make_policy(tiny_dirs, "qwen2", mode, device, cuda_graph=device == "cuda", eviction=eviction)
    compiled.configure_decoding(compile_decode=True)
    a = eager.generate(PROMPTS, max_new_tokens=24, temperature=0)
    b = compiled.generate(PROMPTS, max_new_tokens=24, temperature=0)
    assert a.stats["evictions"] > 3
    assert a.completion_ids == b.completion_ids and a.eviction_log == b.eviction_log
    for x, y in zip(a.logprobs, b.logprobs, strict=True):
        assert_close_to_scale(y, x, rel=3e-5)


def test_compiled_decode_compiles_once_across_prompt_lengths(tiny_dirs):
    """Training batches have new prompt lengths every step. Prompts are padded to a power-of-two
    width under compile, so nearby lengths share one compiled step instead of recompiling (dynamo
    gives up and decodes eagerly after 8 shapes); an adapter update between rollouts does not
    recompile either, and reaches the compiled step (which reads the adapters' stacked copies)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = make_policy(tiny_dirs, "qwen2", "pte", device, cuda_graph=device == "cuda")
    policy.configure_decoding(compile_decode=True)
    eager = make_policy(tiny_dirs, "qwen2", "pte", device, cuda_graph=False)
    policy.generate(PROMPTS, max_new_tokens=4, temperature=0)  # widest prompt: 7 tokens
    with torch.no_grad():  # what an optimizer step does between two rollouts
        for a, b in zip(policy.wrappers, eager.wrappers, strict=True):
            for x, y in ((a.lora_up, b.lora_up), (a.lora_down, b.lora_down)):
                x.add_(0.1)
                y.add_(0.1)
    longer = [p + [77, 78] for p in PROMPTS]  # widest: 9 tokens, the same bucket of 16
    with torch._dynamo.config.patch(error_on_recompile=True):
        res = policy.generate(longer, max_new_tokens=12, temperature=0)
    assert res.completion_ids == eager.generate(longer, max_new_tokens=12, temperature=0).completion_ids
