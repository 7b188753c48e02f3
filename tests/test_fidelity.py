"""Fidelity of a bounded policy to the full-cache model, on tiny random models: the replay's full
distributions, KL / top-1 over the tokens after the first eviction, answer agreement."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import byte_tokenizer
from thoughtfold import AdapterConfig, CacheConfig
from thoughtfold.evaluation.fidelity import (
    TokenFidelity,
    answer_agreement,
    full_cache_traces,
    sequence_fidelity,
    token_fidelity,
)
from thoughtfold.policy import Policy

PROMPTS = ["abc", "hello there", "xyz"]


def policy_of(tiny_dirs, window, mode="none"):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs["qwen2"], dtype=torch.float32).eval()
    return Policy(model, byte_tokenizer(), cache=CacheConfig(window=window),
                  adapter=AdapterConfig(mode=mode, rank=4, alpha=8.0, global_tokens=2))


def test_replay_hands_out_the_distributions_whose_entries_are_its_logprobs(tiny_dirs):
    policy = policy_of(tiny_dirs, window=4)
    res = policy.generate(PROMPTS, max_new_tokens=12, temperature=1.0, seed=0)
    seen = {}

    def keep(logprobs, start, end, rows):
        assert logprobs.shape[:2] == (len(rows), end - start) and not logprobs.requires_grad
        for j, r in enumerate(rows):
            for t in range(start, end):
                seen[r, t] = logprobs[j, t - start]

    lps = policy.replay_logprobs(res.prompt_ids, res.completion_ids, res.eviction_log, distribution_fn=keep)
    for r, (ids, lp) in enumerate(zip(res.completion_ids, lps, strict=True)):
        for t, token in enumerate(ids):
            dist = seen[r, t]
            assert torch.logsumexp(dist, 0).abs() < 1e-4
            assert (dist[token] - lp[t]).abs() < 1e-5


def test_full_cache_traces_are_the_base_models_greedy_decoding_and_restore_the_cache(tiny_dirs):
    policy = policy_of(tiny_dirs, window=4, mode="lora")
    for w in policy.wrappers:  # an adapter that changes the outputs must be switched off
        torch.nn.init.normal_(w.lora_up, std=0.5)
    traces = full_cache_traces(policy, PROMPTS, max_new_tokens=10, batch_size=2, chat_template=False)
    assert policy.cache_config == CacheConfig(window=4)
    base = policy_of(tiny_dirs, window=None)
    expected = base.generate(PROMPTS, max_new_tokens=10, temperature=0.0, chat_template=False)
    assert traces.completion_ids == expected.completion_ids and traces.evictions == [0, 0, 0]


def test_token_fidelity_is_zero_kl_for_a_window_that_never_fills_and_positive_after_evictions(tiny_dirs):
    reference = policy_of(tiny_dirs, window=None)
    traces = full_cache_traces(reference, PROMPTS, max_new_tokens=16, chat_template=False)
    wide, narrow = policy_of(tiny_dirs, window=13), policy_of(tiny_dirs, window=4)
    out = token_fidelity({"wide": wide, "narrow": narrow}, reference, traces.prompt_ids,
                         traces.completion_ids, batch_size=2)
    # W = 13 evicts once, at step 13, before which it equals the full cache: only 2 tokens per trace
    # are compared
    assert out["wide"].tokens == 2 * len(PROMPTS)
    assert out["narrow"].tokens == (16 - 5) * len(PROMPTS)
    assert out["narrow"].kl_after_eviction > 1e-3
    assert 0.0 <= out["narrow"].top1_agreement <= 1.0
    same = token_fidelity({"same": policy_of(tiny_dirs, window=16)}, reference, traces.prompt_ids,
                          traces.completion_ids)
    assert same["same"].tokens == 0 and same["same"].kl_after_eviction == 0.0  # never evicts before the end
    with pytest.raises(ValueError, match="full cache"):
        token_fidelity({"full": reference}, reference, traces.prompt_ids, traces.completion_ids)


def test_kl_matches_a_direct_computation(tiny_dirs):
    reference = policy_of(tiny_dirs, window=None)
    traces = full_cache_traces(reference, PROMPTS[:1], max_new_tokens=10, chat_template=False)
    narrow = policy_of(tiny_dirs, window=4)
    out = token_fidelity({"n": narrow}, reference, traces.prompt_ids, traces.completion_ids)["n"]
    prompt, trace = traces.prompt_ids[0], traces.completion_ids[0]
    logits = reference.model(input_ids=torch.tensor([prompt + trace[:-1]])).logits
    ref = torch.log_softmax(logits[0, len(prompt) - 1 :], -1)
    dists = {}
    narrow.replay_logprobs([prompt], [trace], distribution_fn=lambda lp, a, b, rows: dists.update(
        {t: lp[0, t - a] for t in range(a, b)}))
    kl = [(ref[t].exp() * (ref[t] - dists[t])).sum() for t in range(5, len(trace))]
    hits = [int(dists[t].argmax() == trace[t]) for t in range(5, len(trace))]
    assert out.tokens == len(kl)
    assert out.kl_after_eviction == pytest.approx(float(sum(kl) / len(kl)), rel=1e-4)
    assert out.top1_agreement == pytest.approx(sum(hits) / len(hits))


def test_sequence_fidelity_is_token_fidelity_trace_by_trace(tiny_dirs):
    reference = policy_of(tiny_dirs, window=None)
    traces = full_cache_traces(reference, PROMPTS, max_new_tokens=14, chat_template=False)
    narrow = policy_of(tiny_dirs, window=4)
    per_trace = sequence_fidelity({"n": narrow}, reference, traces.prompt_ids, traces.completion_ids,
                                  batch_size=2)["n"]
    alone = [token_fidelity({"n": narrow}, reference, [p], [t])["n"]
             for p, t in zip(traces.prompt_ids, traces.completion_ids, strict=True)]
    assert [f.tokens for f in per_trace] == [f.tokens for f in alone]
    assert [f.kl_sum for f in per_trace] == pytest.approx([f.kl_sum for f in alone], rel=1e-4)
    assert [f.top1_hits for f in per_trace] == [f.top1_hits for f in alone]


def test_token_fidelity_sums_add_up():
    total = TokenFidelity(1.0, 3.0, 4) + TokenFidelity(1.0, 1.0, 4)
    assert (total.kl_after_eviction, total.top1_agreement, TokenFidelity().top1_agreement) == (0.25, 0.5, 0.0)


def test_answer_agreement_compares_final_answers(tiny_dirs):
    policy = policy_of(tiny_dirs, window=4)
    # references that state an answer the random model will not write, and one with no answer at all
    agreement, compared = answer_agreement(policy, PROMPTS, ["so \\boxed{123456}", "\\boxed{7}", ""],
                                           max_new_tokens=6, chat_template=False)
    assert (agreement, compared) == (0.0, 2)
