"""An independent reference for PTE under the bounded cache, sharing no engine code.

Per sequence it runs the plain HF model once over prompt + completion with a per-query visibility
mask (what each token saw when it was decoded: the prompt and the thought tokens not yet evicted)
and per-token adapter states, each a one-shot softmax over the pre-RoPE K/V (captured by hooks on
k_proj / k_norm and v_proj) of every token evicted before it. The low-rank update is applied by
hooks on the reference model's own linears, reading only the policy's A/B and encoder tensors.
Each token's K/V depend on the states before it, which depend on earlier K/V: the forward is
iterated to its fixed point (one pass per segment; the dependency is strictly causal, so the
unrolled passes equal the fixed point as functions, gradients included). In float64 the engine's
rollout, replay and gradients must equal it to 1e-9.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable

import pytest
import torch
from torch.nn import functional as F
from transformers import AttentionInterface, AutoModelForCausalLM
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from conftest import byte_tokenizer
from thoughtfold import AdapterConfig, CacheConfig
from thoughtfold.policy import Policy
from thoughtfold.training.distill import teacher_targets, token_kl

PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 12], [200, 31, 64, 9]]
TOL = 1e-9
RANK, ALPHA = 4, 8
ATTENTION = "reference_detached_history"


def attention_with_history(module, query, key, value, attention_mask, dropout=0.0, scaling=None, live=None,
                           layer_visible=None, **kwargs):
    """HF's SDPA, or with `live` [T, T] (query, key) pairs whose K/V keep their gradient: every other
    visible key/value enters detached (what the replay's backprop="state" does to cached K/V).
    `layer_visible` [layers, T, T] replaces the mask by the layer's own (per-layer eviction)."""
    if layer_visible is not None:
        attention_mask = layer_visible[module.layer_idx][None, None]
    if live is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    rep = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    keys_t = key.transpose(-1, -2)
    scores = torch.where(live, query @ keys_t, query @ keys_t.detach()) * scaling
    p = scores.masked_fill(~attention_mask, -math.inf).softmax(-1)
    out = (p * live) @ value + (p * ~live) @ value.detach()
    return out.transpose(1, 2).contiguous(), None


def float64_norms(model: torch.nn.Module) -> torch.nn.Module:
    """transformers' RMSNorm rounds its input to float32 whatever the model dtype: gradients through
    it would carry float32 rounding (1e-7 relative, at different places in the engine and here).
    Both sides run the same norm in float64 instead."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))
    for m in model.modules():
        if type(m).__name__.endswith("RMSNorm"):
            m.forward = types.MethodType(forward, m)
    return model


AttentionInterface.register(ATTENTION, attention_with_history)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)


class Reference:
    """The plain HF model of `directory` plus hooks that add (alpha/r) B (S_t (A x)) with a per-token S_t."""

    def __init__(self, directory, policy: Policy, state_update: str):
        self.model = float64_norms(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float64,
                                                                        attn_implementation=ATTENTION).eval())
        self.model.requires_grad_(False)
        self.exact = state_update == "exact"
        self.residual = policy.adapter_config.residual  # (I + S_t) in place of S_t
        self.encoder = dict(policy.encoder.named_parameters())
        adapter = dict(policy.model.named_parameters())
        self.states: torch.Tensor | None = None  # [layers, T, r, r] for the current pass
        self.keys: dict[int, torch.Tensor] = {}  # layer -> pre-RoPE keys [T, kv_dim] of the last pass
        self.values: dict[int, torch.Tensor] = {}
        for name, module in self.model.named_modules():
            if f"{name}.lora_down" in adapter:
                layer = int(name.split(".layers.")[1].split(".")[0])
                hook = self._low_rank(adapter[f"{name}.lora_down"], adapter[f"{name}.lora_up"], layer)
                module.register_forward_hook(hook)
        for i, layer in enumerate(self.model.model.layers):  # after the adapter hooks: K/V include the update
            attn = layer.self_attn
            getattr(attn, "k_norm", attn.k_proj).register_forward_hook(self._capture(self.keys, i))
            attn.v_proj.register_forward_hook(self._capture(self.values, i))

    def _low_rank(self, down: torch.Tensor, up: torch.Tensor, layer: int) -> Callable:
        def hook(module, args, out):
            v = args[0] @ down.T
            u = torch.einsum("tij,btj->bti", self.states[layer], v) + (v if self.residual else 0.0)
            return out + (ALPHA / RANK) * u @ up.T
        return hook

    @staticmethod
    def _capture(store: dict, layer: int) -> Callable:
        def hook(module, args, out):
            store[layer] = out[0].flatten(1)  # [T, kv_heads * head_dim], batch of one
        return hook

    def _segment_states(self, layer_blocks: list[list[list[int]]], detach_kv: bool,
                        truncated: bool = False) -> torch.Tensor:
        """[layers, segments, r, r]: the state each segment reads, from the last pass's K/V
        (`layer_blocks[layer][k]`: what event k evicted from that layer). `truncated`: what came
        before event k enters state k without gradient (only block k's own terms keep theirs)."""
        e = self.encoder
        out = []
        for layer in range(e["queries"].shape[0]):
            q, wk, wv = e["queries"][layer], e["key_proj"][layer], e["value_proj"][layer]

            def attend(k, v):
                return torch.softmax(q @ (k @ wk).T / math.sqrt(q.shape[-1]), -1) @ (v @ wv)  # noqa: B023

            def sums(k, v):  # the softmax's numerator and normaliser, unnormalised (float64, small scores)
                w = torch.exp(q @ (k @ wk).T / math.sqrt(q.shape[-1]))  # noqa: B023
                return w @ (v @ wv), w.sum(-1, keepdim=True)  # noqa: B023

            def rms(s):
                return s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + 1e-6)

            keys, values, blocks = self.keys[layer], self.values[layer], layer_blocks[layer]
            if detach_kv:
                keys, values = keys.detach(), values.detach()
            gk, gv = e["global_keys"][layer], e["global_values"][layer]
            states = [attend(gk, gv) if self.exact else rms(attend(gk, gv))]
            for k in range(len(blocks)):
                if truncated and self.exact:
                    before = sums(torch.cat([gk, keys[[i for b in blocks[:k] for i in b]]]),
                                  torch.cat([gv, values[[i for b in blocks[:k] for i in b]]]))
                    new = sums(keys[blocks[k]], values[blocks[k]])
                    states.append((before[0].detach() + new[0]) / (before[1].detach() + new[1]))
                elif truncated:
                    states.append(rms(states[-1].detach() + attend(keys[blocks[k]], values[blocks[k]])))
                elif self.exact:  # one softmax over the global tokens and everything evicted so far
                    gone = [i for b in blocks[: k + 1] for i in b]
                    states.append(attend(torch.cat([gk, keys[gone]]), torch.cat([gv, values[gone]])))
                else:
                    states.append(rms(states[-1] + attend(keys[blocks[k]], values[blocks[k]])))
            out.append(torch.stack(states))
        return torch.stack(out)

    def logprobs(self, prompt: list[int], completion: list[int], log: list,
                 backprop: str = "full") -> torch.Tensor:
        """Log-probs [n] of `completion` (see `log_distributions`)."""
        return self.log_distributions(prompt, completion, log, backprop).gather(
            -1, torch.tensor(completion)[:, None])[:, 0]

    def log_distributions(self, prompt: list[int], completion: list[int], log: list,
                          backprop: str = "full") -> torch.Tensor:
        """Next-token log-distributions [n, vocab] at every token of `completion`. Gradients as the
        replay's `backprop`: "full" everything; "state": K/V cached in an earlier segment and evicted
        K/V enter without gradient (the states keep theirs); "truncated": as "state", and each state
        takes gradient only through the block evicted just before it."""
        detach_kv = backprop != "full"
        p, n = len(prompt), len(completion)
        t = p + n - 1
        events = [e for e in log if e.step <= n - 2]
        layers = self.model.config.num_hidden_layers
        segment = torch.tensor([0] * p + [sum(e.step <= j for e in events) for j in range(n - 1)])
        blocks = [[[p + i for i in e.by_layer(layers)[layer]] for e in events] for layer in range(layers)]
        visible = torch.ones(layers, t, t, dtype=torch.bool).tril()
        for layer in range(layers):
            for k, block in enumerate(blocks[layer]):  # evicted at event k: invisible to every later segment
                visible[layer, (segment > k).nonzero()[:, 0][:, None], torch.tensor(block)[None]] = False
        ids = torch.tensor([prompt + completion[:-1]])
        kwargs = {"layer_visible": visible}
        if detach_kv:
            kwargs["live"] = segment[:, None] == segment[None]
        width = self.encoder["value_proj"].shape[-1]
        for key in range(layers):
            self.keys[key] = self.values[key] = torch.zeros(t, self.encoder["key_proj"].shape[1],
                                                            dtype=torch.float64)
        for _ in range(len(events) + 1):  # each pass makes one more segment's K/V exact
            states = self._segment_states(blocks, detach_kv, truncated=backprop == "truncated")
            self.states = states[:, segment].reshape(layers, t, width, width)
            logits = self.model(input_ids=ids, attention_mask=visible[:1, None],
                                position_ids=torch.arange(t)[None], **kwargs).logits[0, p - 1:]
        self.states = None
        return F.log_softmax(logits, -1)


def case(tiny_dirs, family: str, state_update: str, window: int, ratio: float, eviction: str = "oldest",
         residual: bool = False):
    """A float64 pte policy with non-zero adapters, its reference, and a rollout of 3 left-padded
    prompts cut to unequal lengths (each keeps >= 3 evictions; a row that stops early has the same
    prefix, logs and log-probs as the lockstep rollout)."""
    model = float64_norms(AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float64).eval())
    adapter = AdapterConfig(mode="pte", rank=RANK, alpha=ALPHA, global_tokens=2, state_update=state_update,
                            residual=residual)
    cache = CacheConfig(window=window, evict_ratio=ratio, eviction=eviction)
    torch.manual_seed(1)  # the encoder's initialisation too: the case must not depend on the tests run before
    policy = Policy(model, byte_tokenizer(), cache=cache, adapter=adapter)
    for w in policy.wrappers:
        torch.nn.init.normal_(w.lora_up, std=0.3)
    res = policy.generate(PROMPTS, max_new_tokens=window + 6 * policy.cache_config.evict_block + 6, seed=1)
    n = len(res.completion_ids[0])
    lengths = [n, n - 2, n - 5]
    completions = [c[:m] for c, m in zip(res.completion_ids, lengths, strict=True)]
    logs = [[e for e in log if e.step <= m - 2] for log, m in zip(res.eviction_log, lengths, strict=True)]
    rollout_lp = [torch.tensor(lp[:m], dtype=torch.float64) for lp,
                  m in zip(res.logprobs, lengths, strict=True)]
    assert all(len(log) >= 3 for log in logs) and len(set(map(len, logs))) > 1
    weights = torch.randn(len(PROMPTS), n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    # a completion that ended (EOS) before its cut is shorter: padding gets no weight
    weights *= torch.arange(n)[None] < torch.tensor([len(c) for c in completions])[:, None]
    return policy, Reference(tiny_dirs[family], policy, state_update), completions, logs, rollout_lp, weights


CASES = [("llama", "exact", 6, 0.5, False), ("llama", "paper", 5, 0.4, False),
         ("qwen2", "exact", 5, 0.4, False), ("qwen2", "paper", 8, 0.25, False),
         ("qwen3", "exact", 8, 0.25, False), ("qwen3", "paper", 6, 0.5, False),
         ("llama", "exact", 5, 0.4, True), ("qwen3", "paper", 8, 0.25, True)]
CASE_NAMES = ("family", "state_update", "window", "ratio", "residual")


def grads(policy: Policy, fn: Callable[[], None]) -> list[torch.Tensor]:
    params = policy.trainable_parameters()
    for p in params:
        p.grad = None
    fn()
    return [p.grad.clone() for p in params]


def assert_close(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> None:
    """Max abs difference <= TOL, relative to the largest reference entry when that exceeds 1."""
    assert all(r.abs().max() > 0 for r in ref)
    worst = max((a - b).abs().max().item() for a, b in zip(ours, ref, strict=True))
    assert worst <= TOL * max(1.0, *(r.abs().max().item() for r in ref)), worst


@pytest.mark.parametrize(CASE_NAMES, CASES)
def test_rollout_and_replay_logprobs_equal_reference(tiny_dirs, family, state_update, window, ratio,
                                                     residual):
    policy, ref, completions, logs, rollout_lp, _ = case(tiny_dirs, family, state_update, window, ratio,
                                                         residual=residual)
    replayed = policy.replay_logprobs(PROMPTS, completions, logs)
    with torch.no_grad():
        expected = [ref.logprobs(p, c, log) for p, c, log in zip(PROMPTS, completions, logs, strict=True)]
    assert_close(rollout_lp, expected)
    assert_close(replayed, expected)


@pytest.mark.parametrize("backprop", ["full", "state", "truncated"])
@pytest.mark.parametrize(CASE_NAMES, CASES)
def test_replay_gradients_equal_reference(tiny_dirs, family, state_update, window, ratio, residual, backprop):
    """"full": everything differentiated, under a window; "state": cached and evicted K/V detached;
    "truncated": as "state", each state differentiated only through the block folded into it."""
    policy, ref, completions, logs, _, weights = case(tiny_dirs, family, state_update, window, ratio,
                                                      residual=residual)

    def replay() -> None:
        policy.replay_logprobs(PROMPTS, completions, logs, backprop=backprop,
                               loss_fn=lambda lp, a, b, rows: (lp * weights[rows, a:b]).sum())

    def reference() -> None:
        sum((ref.logprobs(p, c, log, backprop) * w[: len(c)]).sum()
            for p, c, log, w in zip(PROMPTS, completions, logs, weights, strict=True)).backward()

    assert_close(grads(policy, replay), grads(policy, reference))


SCORED = [("llama", "exact", 6, 0.5, "h2o"), ("qwen2", "paper", 8, 0.25, "snapkv"),
          ("qwen3", "exact", 8, 0.25, "headkv")]


@pytest.mark.parametrize(("family", "state_update", "window", "ratio", "eviction"), SCORED)
def test_scored_eviction_equals_reference(tiny_dirs, family, state_update, window, ratio, eviction):
    """Per-layer, per-sequence choices: rollout and replay log-probs and the state gradient equal the
    reference run with each layer's own visibility and evicted blocks."""
    policy, ref, completions, logs, rollout_lp, weights = case(tiny_dirs, family, state_update, window, ratio,
                                                               eviction)
    chosen = {e.layers for log in logs for e in log}
    assert None not in chosen and any(len(set(layers)) > 1 for layers in chosen)  # layers chose differently
    assert any(len({log[k].layers for log in logs}) > 1 for k in range(3))  # and so did sequences
    with torch.no_grad():
        expected = [ref.logprobs(p, c, log) for p, c, log in zip(PROMPTS, completions, logs, strict=True)]
    assert_close(rollout_lp, expected)
    assert_close(policy.replay_logprobs(PROMPTS, completions, logs), expected)

    def replay() -> None:
        policy.replay_logprobs(PROMPTS, completions, logs, loss_fn=lambda lp, a, b,
                               rows: (lp * weights[rows, a:b]).sum())

    def reference() -> None:
        sum((ref.logprobs(p, c, log, "state") * w[: len(c)]).sum()
            for p, c, log, w in zip(PROMPTS, completions, logs, weights, strict=True)).backward()

    assert_close(grads(policy, replay), grads(policy, reference))


@pytest.mark.parametrize("backprop", ["full", "state", "truncated"])
@pytest.mark.parametrize(CASE_NAMES, [CASES[0], CASES[3], CASES[6]])
def test_distillation_gradients_equal_reference(tiny_dirs, family, state_update, window, ratio, residual,
                                                backprop):
    """The dense distillation loss through the replay (full log-distributions with autograd, the
    teacher's from `teacher_targets`) has the gradient of sum_t w_t KL(teacher_t || policy_t) computed
    directly: the teacher a plain HF forward of the base model, the policy the reference."""
    policy, ref, completions, logs, _, weights = case(tiny_dirs, family, state_update, window, ratio,
                                                      residual=residual)
    targets = teacher_targets(policy, PROMPTS, completions, top_k=None)
    plain = float64_norms(AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float64).eval())
    with torch.no_grad():
        teacher = [F.log_softmax(plain(input_ids=torch.tensor([p + c[:-1]])).logits[0, len(p) - 1:], -1)
                   for p, c in zip(PROMPTS, completions, strict=True)]
    assert_close([targets.logprobs[i, : len(c)] for i, c in enumerate(completions)], teacher)

    def replay() -> None:
        policy.replay_logprobs(PROMPTS, completions, logs, backprop=backprop, loss_input="distribution",
                               loss_fn=lambda lp, a, b, rows: (token_kl(lp, targets.rows(rows, a, b))
                                                               * weights[rows, a:b]).sum())

    def reference() -> None:
        total = 0.0
        for p, c, log, w, t in zip(PROMPTS, completions, logs, weights, teacher, strict=True):
            mine = ref.log_distributions(p, c, log, backprop)
            total = total + ((t.exp() * (t - mine)).sum(-1) * w[: len(c)]).sum()
        total.backward()

    assert_close(grads(policy, replay), grads(policy, reference))


@pytest.mark.parametrize(("family", "eviction"), [("llama", "oldest"), ("qwen3", "h2o")])
def test_rows_admitted_at_different_steps_equal_reference(tiny_dirs, family, eviction):
    """Continuous batching, 2 slots for 3 prompts: the first sequence ends early (EOS), and the third
    takes its slot while the second still decodes. Each row's rollout and replay log-probs equal the
    reference, which decodes every row alone."""
    model = float64_norms(AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float64).eval())
    torch.manual_seed(1)
    policy = Policy(model, byte_tokenizer(), cache=CacheConfig(window=6, evict_ratio=0.5, eviction=eviction),
                    adapter=AdapterConfig(mode="pte", rank=RANK, alpha=ALPHA, global_tokens=2))
    for w in policy.wrappers:
        torch.nn.init.normal_(w.lora_up, std=0.3)
    n_new = 40
    free = policy.generate(PROMPTS, max_new_tokens=n_new, seed=1).completion_ids
    # an EOS token that ends the first sequence after 3 events, the second never and the third late
    end = next(t for d, t in enumerate(free[0])
               if d >= 13 and free[0].index(t) == d and t not in free[1] and t not in free[2][:13])
    policy.model.generation_config.eos_token_id = [256, end]
    res = policy.generate(PROMPTS, max_new_tokens=n_new, seed=1, slots=2)
    assert res.stats["prefills"] == 2 and len(res.completion_ids[0]) < 32 < len(res.completion_ids[1])
    assert all(len(log) >= 3 for log in res.eviction_log), [len(c) for c in res.completion_ids]
    completions, logs = res.completion_ids, res.eviction_log
    ref = Reference(tiny_dirs[family], policy, "exact")
    with torch.no_grad():
        expected = [ref.logprobs(p, c, log) for p, c, log in zip(PROMPTS, completions, logs, strict=True)]
    assert_close([torch.tensor(lp, dtype=torch.float64) for lp in res.logprobs], expected)
    assert_close(policy.replay_logprobs(PROMPTS, completions, logs), expected)
