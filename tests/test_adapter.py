"""Adapters: the low-rank update of every linear (grouped over shared inputs), exactly the base model
at initialisation, taken out again by detach_adapters, and no-grad weight copies that follow updates."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM

from conftest import adapted_policy, assert_close_to_scale, byte_tokenizer
from thoughtfold import AdapterConfig, ConfigError
from thoughtfold.engine.adapter import set_states
from thoughtfold.persist import adapter_settings
from thoughtfold.policy import Policy

PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 12]]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_zero_init_adapters_give_the_base_model_exactly(tiny_dirs, family):
    base = adapted_policy(tiny_dirs, family, "none").generate(PROMPTS, max_new_tokens=30, temperature=0)
    for mode in ("lora", "pte"):
        res = adapted_policy(tiny_dirs, family, mode).generate(PROMPTS, max_new_tokens=30, temperature=0)
        assert res.stats["evictions"] > 0
        assert res.completion_ids == base.completion_ids
        assert res.logprobs == base.logprobs


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_every_linear_gets_its_own_state_modulated_update(tiny_dirs, family):
    """Grouped siblings (q/k/v, gate/up share one down GEMM and one state product) still give each
    linear exactly W x + (alpha/r) B S A x with its own A and B and the layer's state (the paper's
    form; the residual one adds the static B A x, below)."""
    p = adapted_policy(tiny_dirs, family, "pte", residual=False)
    torch.manual_seed(1)
    layer = p.model.model.layers[0]
    wrappers = [w for w in p.wrappers if w.layer == 0]
    assert sorted(len(w.group.members) for w in wrappers) == [1, 1, 2, 2, 3, 3, 3]
    state = torch.randn(2, 4, 4)
    with torch.no_grad():
        for w in wrappers:
            w.lora_up.normal_()
            w.state = state
        x = torch.randn(2, 5, layer.self_attn.q_proj.base.in_features)
        for name in ("q_proj", "k_proj", "v_proj"):  # called in model order on one tensor
            w = getattr(layer.self_attn, name)
            expected = w.base(x) + w.scaling * x @ w.lora_down.T @ state.transpose(-1, -2) @ w.lora_up.T
            assert_close_to_scale(w(x), expected, rel=1e-5)
        assert layer.self_attn.q_proj.group._input is None  # released once every member has its slice
        up = layer.mlp.up_proj  # a member called alone, first, still gets its own update
        expected = up.base(x) + up.scaling * x @ up.lora_down.T @ state.mT @ up.lora_up.T
        assert_close_to_scale(up(x), expected, rel=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_residual_pte_is_lora_c_plus_the_state_contribution(tiny_dirs, family):
    """`residual`: W x + (alpha/r) B (I + S) A x. With a zero state it is exactly the
    static LoRA with the same A and B (LoRA_c is its special case); otherwise it adds B S A x to it."""
    lora = adapted_policy(tiny_dirs, family, "lora")
    pte = adapted_policy(tiny_dirs, family, "pte", residual=True)
    torch.manual_seed(2)
    with torch.no_grad():
        for a, b in zip(lora.wrappers, pte.wrappers, strict=True):
            a.lora_up.normal_()
            b.lora_up.copy_(a.lora_up)
            b.lora_down.copy_(a.lora_down)
        x = torch.randn(2, 5, lora.model.config.hidden_size)
        state = torch.randn(2, 4, 4)
        for a, b in zip(lora.wrappers, pte.wrappers, strict=True):
            if b.base.in_features != x.shape[-1]:
                continue
            set_states(pte.wrappers, torch.zeros(2, 2, 4, 4))  # [layers, batch, r, r]
            # a fresh input per call: a group caches its siblings' slices of one input
            assert_close_to_scale(b(x.clone()), a(x.clone()), rel=1e-6)
            set_states(pte.wrappers, state.expand(2, -1, -1, -1))
            expected = a(x.clone()) + b.scaling * x @ b.lora_down.T @ state.mT @ b.lora_up.T
            assert_close_to_scale(b(x.clone()), expected, rel=1e-5)


def test_residual_is_validated_and_old_adapters_load_as_the_paper_form(tmp_path, tiny_dirs):
    with pytest.raises(ConfigError, match="residual must be true or false"):
        AdapterConfig(mode="pte", residual="yes")
    policy = adapted_policy(tiny_dirs, "llama", "pte", residual=True)
    policy.save_adapter(str(tmp_path / "a"))
    meta_path = tmp_path / "a" / "thoughtfold_adapter.json"
    meta = json.loads(meta_path.read_text())
    assert meta["adapter"]["residual"] is True
    del meta["adapter"]["residual"]  # written before the option existed: the paper's A S B
    meta_path.write_text(json.dumps(meta))
    assert adapter_settings(tmp_path / "a")[0].residual is False


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
                                              torch.ops.aten.baddbmm)
        return func(*args, **(kwargs or {}))


def test_pte_adds_four_down_projections_per_layer_not_seven(tiny_dirs):
    """The grouping is what keeps PTE's decode cost low: per layer, 4 down GEMMs + 4 state products
    + 7 up updates over the base model's matmuls, where one adapter per linear would add 21."""
    ids = torch.tensor([[5, 17, 99, 3]])
    counts = {}
    for mode in ("none", "pte"):
        p = adapted_policy(tiny_dirs, "qwen2", mode)
        p.folder.apply(p.folder.start(1))
        with torch.no_grad(), _CountMatmuls() as counter:
            p.model(input_ids=ids)
        counts[mode] = counter.count
    assert counts["pte"] - counts["none"] == 15 * p.model.config.num_hidden_layers


def test_target_modules_and_bad_targets(tiny_dirs):
    p = adapted_policy(tiny_dirs, "llama", "lora", target_modules=("q_proj", "v_proj"))
    assert len(p.wrappers) == 2 * p.model.config.num_hidden_layers
    assert len(p.trainable_parameters()) == 2 * len(p.wrappers)
    with pytest.raises(ConfigError, match="match no linear"):
        adapted_policy(tiny_dirs, "llama", "lora", target_modules=("nope_proj",))


def test_detach_adapters_restores_the_plain_model(tiny_dirs):
    from thoughtfold.engine.adapter import LowRankLinear, detach_adapters

    p = adapted_policy(tiny_dirs, "llama", "lora")
    for t in p.trainable_parameters():
        t.data.normal_(0, 0.3)
    ids = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        adapted = p.model(input_ids=ids).logits
        detach_adapters(p.model, p.wrappers)
        plain = p.model(input_ids=ids).logits
        fresh = AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32)
        base = fresh(input_ids=ids).logits
    assert not any(isinstance(m, LowRankLinear) for m in p.model.modules())
    assert torch.equal(plain, base) and not torch.allclose(adapted, base)


def test_no_grad_cast_copies_follow_optimizer_steps(tiny_dirs):
    """In a bf16 model the no-grad path keeps bf16 copies of the fp32 adapter weights; an in-place
    update (what an optimizer step does) must reach the next rollout, and both paths agree."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"], dtype=torch.bfloat16).eval()
    policy = Policy(model, byte_tokenizer(), adapter=AdapterConfig(mode="lora", rank=4))
    ids = torch.tensor([[5, 17, 99, 3]])
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    with torch.no_grad():
        before = model(input_ids=ids).logits
    logits = model(input_ids=ids).logits  # autograd path
    torch.testing.assert_close(logits.detach(), before)
    logits.float().pow(2).mean().backward()
    optimizer.step()
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, model(input_ids=ids).logits.detach())


