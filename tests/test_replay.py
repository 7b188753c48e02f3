"""The central correctness test: replay log-probs equal the rollout's sampling log-probs, in every
mode, across eviction events; plus the gradient semantics of truncated and full backprop."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import FAMILIES, assert_close_to_scale, byte_tokenizer, end_at_different_steps
from thoughtfold import AdapterConfig, CacheConfig, ConfigError
from thoughtfold.engine.eviction import EvictionEvent
from thoughtfold.engine.replay import default_schedule, token_logprobs
from thoughtfold.policy import Policy

PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 12], [200, 31, 64, 9]]


def make_policy(tiny_dirs, family, mode, window=8, ratio=0.25, dtype=torch.float32, std=0.3, **adapter):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=dtype).eval()
    cfg = AdapterConfig(mode=mode, rank=4, alpha=8, global_tokens=adapter.pop("global_tokens", 3), **adapter)
    policy = Policy(model, byte_tokenizer(), cache=CacheConfig(window=window, evict_ratio=ratio), adapter=cfg)
    torch.manual_seed(7)
    for w in policy.wrappers:  # non-zero adapters, so that the state actually changes the outputs
        torch.nn.init.normal_(w.lora_up, std=std)
    return policy


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["none", "lora", "pte"])
def test_replay_equals_rollout_logprobs(tiny_dirs, family, mode):
    policy = make_policy(tiny_dirs, family, mode)
    res = policy.generate(PROMPTS, max_new_tokens=40, temperature=1.0, seed=5)
    assert res.stats["evictions"] >= 4
    replayed = policy.replay_logprobs(res.prompt_ids, res.completion_ids, res.eviction_log)
    for ours, ref in zip(replayed, res.logprobs, strict=True):
        assert_close_to_scale(ours, ref, rel=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_is_exact_in_float64_with_large_adapters(tiny_dirs, family):
    """The replay is the rollout's computation, not an approximation of it: with adapter weights
    large enough that float32 rounding, amplified through the chain of states, moves the log-probs
    by 1e-4 to 1e-3, float64 agrees to the float32 rounding of the log-softmax itself."""
    policy = make_policy(tiny_dirs, family, "pte", dtype=torch.float64, std=1.0)
    res = policy.generate(PROMPTS, max_new_tokens=40, temperature=1.0, seed=5)
    assert res.stats["evictions"] >= 4
    replayed = policy.replay_logprobs(res.prompt_ids, res.completion_ids, res.eviction_log)
    for ours, ref in zip(replayed, res.logprobs, strict=True):
        assert_close_to_scale(ours, ref, rel=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_replay_equals_continuous_batching_logprobs(tiny_dirs, family):
    """Sequences admitted into slots at different steps (2 slots, sequences ending at EOS) replay
    to their rollout log-probs."""
    policy = make_policy(tiny_dirs, family, "pte")
    end_at_different_steps(policy, PROMPTS * 2, 40, temperature=1.5, seed=3)
    res = policy.generate(PROMPTS * 2, max_new_tokens=40, temperature=1.5, seed=3, slots=2)
    assert res.stats["prefills"] > 1 and len({len(c) for c in res.completion_ids}) > 2
    assert max(res.evictions) >= 4
    replayed = policy.replay_logprobs(res.prompt_ids, res.completion_ids, res.eviction_log, temperature=1.5)
    for ours, ref in zip(replayed, res.logprobs, strict=True):
        assert_close_to_scale(ours, ref, rel=1e-5)


def test_replay_with_default_schedule_and_variable_lengths(tiny_dirs):
    policy = make_policy(tiny_dirs, "llama", "pte", window=6, ratio=0.5)
    policy.model.generation_config.eos_token_id = [256, 65, 66, 67]
    res = policy.generate(PROMPTS, max_new_tokens=30, temperature=1.5, seed=11)
    for c, log in zip(res.completion_ids, res.eviction_log, strict=True):
        assert log == default_schedule(len(c), policy.cache_config)
    replayed = policy.replay_logprobs(res.prompt_ids, res.completion_ids, temperature=1.5)  # schedule derived
    for ours, ref in zip(replayed, res.logprobs, strict=True):
        assert_close_to_scale(ours, ref, rel=1e-5)


def test_pte_state_changes_outputs_after_eviction(tiny_dirs):
    """Sanity: the same pte policy with its state frozen (nothing folded in) agrees up to the first
    eviction and differs after it, so the equality above is not vacuous."""
    policy = make_policy(tiny_dirs, "qwen2", "pte")
    res = policy.generate(PROMPTS[:1], max_new_tokens=30, temperature=0)
    policy.encoder.global_only = True  # absorb() now keeps the initial state
    frozen = policy.replay_logprobs(res.prompt_ids, res.completion_ids, res.eviction_log)[0]
    diff = (frozen - torch.tensor(res.logprobs[0])).abs()
    first = res.eviction_log[0][0].step  # completion[first + 1] is the first token predicted after it
    assert diff[: first + 1].max() <= 1e-4 and diff[first + 1 :].max() > 1e-3


def naive_two_segment_loss(policy, prompt, completion, event, weights, detach, detach_state=None):
    """Reference for one eviction event with the plain HF model and its own DynamicCache: segment 0
    as one causal forward, then the evicted block folded into the state and cut from the cache,
    then segment 1. `detach` cuts the graph at the boundary (truncated backprop)."""
    from transformers import DynamicCache

    from thoughtfold.engine.cache import cache_kwarg

    model, folder, p, s, n = policy.model, policy.folder, len(prompt), event.step, len(completion)
    kw, cache = cache_kwarg(model), DynamicCache(config=model.config)
    state = folder.start(1)
    out = model(input_ids=torch.tensor([list(prompt) + list(completion[:s])]), use_cache=True, **{kw: cache})
    lp0 = torch.log_softmax(out.logits[0, p - 1 :], -1).gather(-1, torch.tensor(completion[: s + 1])[:, None])
    gone = [p + t for t in event.tokens]
    keep = torch.tensor([i for i in range(p + s) if i not in gone])
    cut = (lambda t: t.detach()) if detach else (lambda t: t)  # noqa: E731
    keys = torch.stack([cut(layer.keys[:, :, gone]) for layer in cache.layers])
    values = torch.stack([cut(layer.values[:, :, gone]) for layer in cache.layers])
    for layer in cache.layers:
        layer.keys, layer.values = cut(layer.keys[:, :, keep]), cut(layer.values[:, :, keep])
    detach_state = detach if detach_state is None else detach_state
    state = folder.fold(state.detach() if detach_state else state, keys, values, torch.tensor([gone]))
    ids1 = torch.tensor([list(completion[s : n - 1])])
    out = model(
        input_ids=ids1, attention_mask=torch.ones(1, len(keep) + ids1.shape[1], dtype=torch.long),
        position_ids=torch.arange(p + s, p + n - 1)[None], use_cache=True, **{kw: cache},
    )
    lp1 = torch.log_softmax(out.logits[0], -1).gather(-1, torch.tensor(completion[s + 1 :])[:, None])
    folder.apply(None)
    return (torch.cat([lp0, lp1])[:, 0] * weights).sum()


def grads_of(policy, fn):
    for p in policy.trainable_parameters():
        p.grad = None
    fn()
    return [p.grad.clone() for p in policy.trainable_parameters()]


def two_segment_case(tiny_dirs, family, seed):
    """A pte policy, one greedy rollout with one eviction event, per-token loss weights and the
    segment loss over them: the set-up of the gradient tests against `naive_two_segment_loss`."""
    policy = make_policy(tiny_dirs, family, "pte", window=8, ratio=0.5)
    res = policy.generate(PROMPTS[:1], max_new_tokens=11, temperature=0)
    prompt, completion, log = res.prompt_ids[0], res.completion_ids[0], res.eviction_log[0]
    weights = torch.randn(len(completion), generator=torch.Generator().manual_seed(seed))

    def loss_fn(lp, start, end, rows):
        return (lp[0] * weights[start:end]).sum()

    return policy, prompt, completion, log, weights, loss_fn


@pytest.mark.parametrize("backprop", ["truncated", "full"])
def test_replay_gradients_match_naive_two_segment(tiny_dirs, backprop):
    policy, prompt, completion, log, weights, loss_fn = two_segment_case(tiny_dirs, "llama", seed=0)
    assert len(log) == 1 and len(completion) == 11
    ours = grads_of(policy, lambda: policy.replay_logprobs(
        [prompt], [completion], [log], loss_fn=loss_fn, backprop=backprop))
    ref = grads_of(policy, lambda: naive_two_segment_loss(
        policy, prompt, completion, log[0], weights, detach=backprop != "full").backward())
    assert any(g.abs().max() > 0 for g in ours)
    for a, b in zip(ours, ref, strict=True):
        assert_close_to_scale(a, b, rel=1e-5)
    if backprop == "full":  # the encoder's queries get gradient through the pre-eviction state too
        trunc = grads_of(policy, lambda: policy.replay_logprobs([prompt], [completion], [log],
                                                                loss_fn=loss_fn, backprop="truncated"))
        assert any(not torch.allclose(a, b) for a, b in zip(ours, trunc, strict=True))


def test_state_backprop_gradients_match_naive_with_kv_detached_only(tiny_dirs):
    """backprop="state": the exact gradient through the state chain, cached K/V detached."""
    policy, prompt, completion, log, weights, loss_fn = two_segment_case(tiny_dirs, "qwen2", seed=1)
    ours = grads_of(policy, lambda: policy.replay_logprobs(
        [prompt], [completion], [log], loss_fn=loss_fn, backprop="state"))
    ref = grads_of(policy, lambda: naive_two_segment_loss(
        policy, prompt, completion, log[0], weights, detach=True, detach_state=False).backward())
    for a, b in zip(ours, ref, strict=True):
        assert_close_to_scale(a, b, rel=1e-5)
    trunc = grads_of(policy, lambda: policy.replay_logprobs([prompt], [completion], [log], loss_fn=loss_fn,
                                                                backprop="truncated"))
    assert any(not torch.allclose(a, b) for a, b in zip(ours, trunc, strict=True))
    with pytest.raises(ConfigError, match="backprop must be one of state, truncated, full"):
        policy.replay_logprobs([prompt], [completion], [log], loss_fn=loss_fn, backprop="bptt")


def test_full_backprop_equals_plain_autograd_full_cache(tiny_dirs):
    policy = make_policy(tiny_dirs, "qwen3", "lora", window=None)
    res = policy.generate(PROMPTS[:1], max_new_tokens=12, temperature=1.0, seed=2)
    prompt, completion = res.prompt_ids[0], res.completion_ids[0]
    weights = torch.randn(len(completion))

    def plain():
        logits = policy.model(input_ids=torch.tensor([prompt + completion[:-1]])).logits[0, len(prompt) - 1 :]
        lp = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
        (lp * weights).sum().backward()

    ours = grads_of(policy, lambda: policy.replay_logprobs(
        [prompt], [completion], loss_fn=lambda lp, a, b, rows: (lp[0] * weights[a:b]).sum(), backprop="full"))
    ref = grads_of(policy, plain)
    for a, b in zip(ours, ref, strict=True):
        assert_close_to_scale(a, b, rel=1e-5)


def test_state_backprop_equals_one_graph_with_only_the_cached_kv_detached(tiny_dirs, monkeypatch):
    """Over several eviction events: the segment-wise replay plus the second pass through the state
    chain gives the gradients of one full graph in which only the cached K/V are detached."""
    import thoughtfold.engine.replay as replay_mod

    res = make_policy(tiny_dirs, "llama", "pte", window=4).generate(PROMPTS, max_new_tokens=14,
                                                                     temperature=1.0, seed=3)
    assert min(len(log) for log in res.eviction_log) >= 3
    total = sum(map(len, res.completion_ids))

    def loss_fn(lp, a, b, rows):
        return -lp.sum() / total

    def run(backprop):
        torch.manual_seed(0)
        policy = make_policy(tiny_dirs, "llama", "pte", window=4)
        return grads_of(policy, lambda: policy.replay_logprobs(res.prompt_ids, res.completion_ids,
                                                               res.eviction_log, loss_fn=loss_fn,
                                                               backprop=backprop))

    state = run("state")

    def append_detached(self, cache, tokens, valid, detach, append=replay_mod._Context.append):
        return append(self, cache, tokens, valid, True)

    monkeypatch.setattr(replay_mod._Context, "append", append_detached)
    reference = run("full")
    monkeypatch.undo()
    assert state[-1].abs().sum() > 0  # the encoder gets gradients
    for a, b in zip(state, reference, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("eviction", ["h2o", "snapkv", "headkv"])
def test_scored_eviction_replays_its_rollout(tiny_dirs, family, eviction):
    """Rows and layers evict different tokens; the replay, fed the log through its JSON form,
    reproduces the rollout's log-probs."""
    policy = make_policy(tiny_dirs, family, "pte")
    policy.cache_config = CacheConfig(window=8, eviction=eviction)
    res = policy.generate(PROMPTS, max_new_tokens=40, temperature=1.0, seed=5)
    assert res.stats["evictions"] >= 4
    assert all(e.layers is not None for log in res.eviction_log for e in log)
    # (h2o on a random model tends to evict the same just-unprotected tokens everywhere)
    if eviction != "h2o":
        assert len({tuple(e.layers for e in log) for log in res.eviction_log}) > 1  # rows chose differently
    logs = [[EvictionEvent.from_dict(e.to_dict()) for e in log] for log in res.eviction_log]
    replayed = policy.replay_logprobs(res.prompt_ids, res.completion_ids, logs)
    for ours, ref in zip(replayed, res.logprobs, strict=True):  # float32: rounding amplified by the states
        assert_close_to_scale(ours, ref, rel=2e-5)  # (docs/design.md §1.5: typically <= 1e-4)
    # teacher-forcing the same completions through the decode path makes the same choices: what
    # SFT and fidelity replays of given targets use
    assert policy.eviction_logs(res.prompt_ids, res.completion_ids) == res.eviction_log
    policy.cache_config = CacheConfig(window=8)
    assert policy.eviction_logs(res.prompt_ids, res.completion_ids) is None  # oldest: the default schedule


def test_token_logprobs_equal_the_full_log_softmax_and_its_gradient():
    """Chunked over tokens, the sampled tokens' log-probs and their gradient are the full
    log-softmax's (float64), whatever the chunk, at any temperature; half-precision logits are
    widened chunk by chunk."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 50, dtype=torch.float64, generator=gen) * 4
    tokens = torch.randint(0, 50, (3, 7), generator=gen)
    weights = torch.randn(3, 7, dtype=torch.float64, generator=gen)
    for temperature in (1.0, 0.6):
        full = logits.clone().requires_grad_()
        want = torch.log_softmax(full / temperature, -1).gather(-1, tokens[..., None])[..., 0]
        (want * weights).sum().backward()
        for chunk in (1, 4, 21, None):
            mine = logits.clone().requires_grad_()
            got = token_logprobs(mine, tokens, temperature, torch.float64, chunk)
            (got * weights).sum().backward()
            torch.testing.assert_close(got, want, rtol=0, atol=1e-13)
            torch.testing.assert_close(mine.grad, full.grad, rtol=0, atol=1e-13)
    half = logits.to(torch.bfloat16)
    expected = torch.log_softmax(half.float(), -1).gather(-1, tokens[..., None])[..., 0]
    torch.testing.assert_close(token_logprobs(half, tokens, 1.0, torch.float32, 5), expected)


def test_chunked_replay_losses_and_gradients_equal_the_unchunked_computation(tiny_dirs, monkeypatch):
    """The replay's losses and gradients (float64, every backprop mode, temperature) are those of the
    full float32 log-softmax it computed before, with the chunk down to one token."""
    import thoughtfold.engine.replay as replay_mod

    policy = make_policy(tiny_dirs, "qwen2", "pte", dtype=torch.float64)
    res = policy.generate(PROMPTS, max_new_tokens=30, temperature=0.8, seed=4)
    weights = torch.randn(len(PROMPTS), 30, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def run(backprop):
        losses = []

        def loss_fn(lp, a, b, rows):
            losses.append((lp * weights[rows, a:b]).sum())
            return losses[-1]

        grads = grads_of(policy, lambda: policy.replay_logprobs(
            res.prompt_ids, res.completion_ids, res.eviction_log, loss_fn=loss_fn, temperature=0.8,
            backprop=backprop))
        return torch.stack(losses).detach(), grads

    def unchunked(logits, tokens, temperature, dtype):
        return torch.log_softmax(logits.to(dtype) / temperature, -1).gather(-1, tokens[..., None])[..., 0]

    for backprop in ("state", "truncated", "full"):
        monkeypatch.setattr(replay_mod, "LOGPROB_CHUNK", 1)
        losses, grads = run(backprop)
        monkeypatch.setattr(replay_mod, "token_logprobs", unchunked)
        want_losses, want_grads = run(backprop)
        monkeypatch.undo()
        assert len(losses) > 4 and all(g.abs().max() > 0 for g in want_grads)
        torch.testing.assert_close(losses, want_losses, rtol=1e-12, atol=0)
        for a, b in zip(grads, want_grads, strict=True):
            assert_close_to_scale(a, b, rel=1e-12)
