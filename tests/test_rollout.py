"""The decode engine against transformers itself: full-cache equality with `generate`, and after
evictions, step-by-step equality with the plain HF model decoding over exactly the visible tokens."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from conftest import FAMILIES, assert_close_to_scale, byte_tokenizer, end_at_different_steps
from thoughtfold import AdapterConfig, CacheConfig, ConfigError
from thoughtfold.config import SamplingConfig
from thoughtfold.engine.cache import cache_kwarg
from thoughtfold.engine.eviction import EvictionEvent
from thoughtfold.engine.fold import StateFolder
from thoughtfold.engine.rollout import rollout
from thoughtfold.engine.sampling import sample
from thoughtfold.policy import Policy

PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 12], [200, 31, 64, 9]]


def load(tiny_dirs, family, cache=None):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32).eval()
    return Policy(model, byte_tokenizer(), cache=cache)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_window_matches_hf_generate(tiny_dirs, family):
    """With W >= generated length, greedy tokens and log-probs equal HF generate (left-padded batch)."""
    n_new = 24
    policy = load(tiny_dirs, family, CacheConfig(window=64))
    ours = policy.generate(PROMPTS, max_new_tokens=n_new, temperature=0)
    assert sum(ours.evictions) == 0

    width = max(map(len, PROMPTS))
    ids = torch.tensor([[256] * (width - len(p)) + p for p in PROMPTS])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in PROMPTS])
    hf = policy.model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False,
        output_logits=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=256,
    )
    hf_tokens = hf.sequences[:, width:]
    hf_lp = torch.stack([torch.log_softmax(lg.float(), -1) for lg in hf.logits], 1)
    hf_lp = hf_lp.gather(-1, hf_tokens[..., None])[..., 0]
    for i in range(len(PROMPTS)):
        n = len(ours.completion_ids[i])
        assert ours.completion_ids[i] == hf_tokens[i, :n].tolist()
        assert_close_to_scale(ours.logprobs[i], hf_lp[i, :n], rel=1e-5)


def reference_bounded_logits(model, prompts, tokens, events, window):
    """Plain HF model + its own DynamicCache, decoding the given tokens; at each eviction event the
    evicted entries are cut out of the HF cache. A bounded cache never recomputes K/V, so this is
    exactly 'the model on the visible tokens (prompt + surviving window) at true positions'."""
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    valid = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    plen = valid.sum(-1)
    cache = DynamicCache(config=model.config)
    pos = (valid.cumsum(-1) - 1).clamp_min(0)
    kw = cache_kwarg(model)
    out = model(input_ids=ids, attention_mask=valid, position_ids=pos, use_cache=True, **{kw: cache})
    logits = [out.logits[:, -1]]
    visible = list(range(width))  # cache entries: padded prompt slots, then thought tokens
    key_mask = valid.clone()
    by_step = {e.step: e for e in events}
    for t in range(tokens.shape[1] - 1):
        if t in by_step:
            gone = {width + tok for tok in by_step[t].tokens}
            keep = [i for i, v in enumerate(visible) if v not in gone]
            idx = torch.tensor(keep)
            for layer in cache.layers:
                layer.keys, layer.values = layer.keys[:, :, idx], layer.values[:, :, idx]
            visible = [visible[i] for i in keep]
            key_mask = key_mask[:, idx]
        visible.append(width + t)
        key_mask = torch.cat([key_mask, torch.ones(len(prompts), 1, dtype=key_mask.dtype)], 1)
        out = model(
            input_ids=tokens[:, t : t + 1], attention_mask=key_mask, position_ids=(plen + t)[:, None],
            use_cache=True, **{kw: cache},
        )
        logits.append(out.logits[:, -1])
    return torch.stack(logits, 1)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("window,ratio", [(8, 0.25), (10, 0.25), (7, 1.0), (12, 0.5), (5, 0.3)])
def test_bounded_logits_match_visible_token_reference(tiny_dirs, family, window, ratio):
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float32).eval()
    cfg = CacheConfig(window=window, evict_ratio=ratio)
    folder = StateFolder(model, [], None)
    sampling = SamplingConfig(max_new_tokens=40, temperature=1.0, seed=3)
    seen = []  # every forward's next-token logits, read off the output layer: the prefill, then each step
    hook = model.get_output_embeddings().register_forward_hook(lambda m, i,
                                                               out: seen.append(out[:, -1].clone()))
    try:
        raw = rollout(model, folder, PROMPTS, cfg, sampling)
    finally:
        hook.remove()
    events = raw.logs[0]
    assert len(events) >= 3 and all(log == events for log in raw.logs)
    block = cfg.evict_block
    for k, e in enumerate(events):  # the schedule is a pure function of (W, rho, step)
        assert e.step == window + k * block
        assert e.tokens == tuple(range(k * block, (k + 1) * block))
    with torch.no_grad():
        ref = reference_bounded_logits(model, PROMPTS, torch.stack(raw.tokens), events, window)
    ours = torch.stack(seen, 1)
    assert ours.shape == ref.shape
    assert_close_to_scale(ours, ref, rel=1e-5)


def test_cache_memory_constant_in_length(tiny_dirs):
    window = 16
    policy = load(tiny_dirs, "llama", CacheConfig(window=window))
    short = policy.generate([PROMPTS[0]], max_new_tokens=window, temperature=1.0, seed=0)
    long = policy.generate([PROMPTS[0]], max_new_tokens=8 * window, temperature=1.0, seed=0)
    assert long.stats["evictions"] > 0
    assert long.stats["cache_bytes"] == short.stats["cache_bytes"]
    assert long.peak_cache_tokens[0] == len(PROMPTS[0]) + window
    full = load(tiny_dirs, "llama", CacheConfig(window=None))
    full_long = full.generate([PROMPTS[0]], max_new_tokens=8 * window, temperature=1.0, seed=0)
    assert full_long.stats["cache_bytes"] > 4 * long.stats["cache_bytes"]


def test_sampling_is_seeded_and_logprobs_untruncated(tiny_dirs):
    policy = load(tiny_dirs, "qwen2", CacheConfig(window=8))
    a = policy.generate(PROMPTS, max_new_tokens=20, temperature=0.7, top_p=0.9, top_k=20, seed=1)
    b = policy.generate(PROMPTS, max_new_tokens=20, temperature=0.7, top_p=0.9, top_k=20, seed=1)
    assert a.completion_ids == b.completion_ids and a.logprobs == b.logprobs
    logits = torch.randn(4, 50)
    uniforms = torch.rand(4, dtype=torch.float64)
    tok, lp = sample(logits, SamplingConfig(temperature=0.5, top_k=3, seed=0), uniforms)
    assert torch.allclose(lp, torch.log_softmax(logits / 0.5, -1).gather(-1, tok[:, None])[:, 0])
    kept = logits.topk(3, dim=-1).indices
    assert all(t in kept[i] for i, t in enumerate(tok.tolist()))


def test_eos_and_stop_strings_end_each_sequence(tiny_dirs):
    policy = load(tiny_dirs, "llama", CacheConfig(window=8))
    free = policy.generate(PROMPTS, max_new_tokens=30, temperature=0)
    # make a token the sequence actually produces the EOS token: it must stop right there
    target = free.completion_ids[0][5]
    policy.model.generation_config.eos_token_id = [256, target]
    stopped = policy.generate(PROMPTS, max_new_tokens=30, temperature=0)
    first = free.completion_ids[0].index(target)
    assert stopped.completion_ids[0] == free.completion_ids[0][: first + 1]
    assert not stopped.truncated[0]
    assert all(e.step <= first - 1 for e in stopped.eviction_log[0])
    policy.model.generation_config.eos_token_id = 256
    text = free.texts[1]
    stop = text[6:8]
    cut = policy.generate(PROMPTS, max_new_tokens=30, temperature=0, stop=[stop])
    ids = cut.completion_ids[1]
    assert stop in cut.texts[1]
    assert stop not in policy.tokenizer.decode(ids[:-1], skip_special_tokens=True)  # shortest prefix
    assert not cut.truncated[1]
    assert len(cut.completion_ids[1]) < len(free.completion_ids[1])


def test_bad_sampling_settings_raise_config_errors(tiny_dirs):
    policy = load(tiny_dirs, "llama", CacheConfig(window=8))
    for kwargs in ({"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0.0}, {"top_k": -2}):
        with pytest.raises(ConfigError):
            policy.generate(PROMPTS, **kwargs)


def test_prompt_longer_than_max_positions_is_a_typed_error(tiny_dirs):
    from thoughtfold import PromptTooLongError

    policy = load(tiny_dirs, "llama", CacheConfig(window=8))
    with pytest.raises(PromptTooLongError, match="512 positions"):
        policy.generate([[5] * 600], max_new_tokens=4)


# --------------------------------------------------------------------------- continuous batching

QUEUE = [[5, 17, 99, 3, 42, 7, 8], [11, 12], [200, 31, 64, 9], [7, 7, 7], [99, 100, 101, 102, 103], [42]]


def float64_policy(tiny_dirs, family, eviction="oldest", eviction_policy=None):
    """A float64 pte policy with non-zero adapters (so states change the outputs), window 6, E = 3. The
    paper's update B S A: with these weights its sequences stay varied enough to end at spread-out
    steps (the residual form's static B A dominates them); slots do not interact with the form."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dirs[family], dtype=torch.float64).eval()
    torch.manual_seed(0)
    policy = Policy(model, byte_tokenizer(), cache=CacheConfig(window=6, evict_ratio=0.5, eviction=eviction),
                    adapter=AdapterConfig(mode="pte", rank=4, global_tokens=2, residual=False),
                    eviction_policy=eviction_policy)
    for w in policy.wrappers:
        torch.nn.init.normal_(w.lora_up, std=0.3)
    return policy


def assert_same_sequences(got, want, rel):
    assert got.completion_ids == want.completion_ids
    assert got.eviction_log == want.eviction_log
    assert got.truncated == want.truncated
    for a, b in zip(got.logprobs, want.logprobs, strict=True):
        assert_close_to_scale(a, b, rel=rel)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("eviction", ["oldest", "h2o", "snapkv", "headkv"])
def test_continuous_batching_equals_static_batching_and_decoding_alone(tiny_dirs, family, eviction):
    """Sequences end at different steps and their slots take waiting prompts: every sequence's tokens,
    eviction log (per row and layer under a scored policy) and log-probs are those of static batching
    and of decoding it alone (one slot), greedy and seeded -- they do not depend on the slots."""
    policy = float64_policy(tiny_dirs, family, eviction)
    for sampling in (dict(temperature=0), dict(temperature=1.0, top_k=40, seed=3)):
        end_at_different_steps(policy, QUEUE, 40, **sampling)
        static = policy.generate(QUEUE, max_new_tokens=40, **sampling)
        assert len({len(c) for c in static.completion_ids}) >= 3 and static.stats["evictions"] >= 3
        assert static.stats["prefills"] == 1
        for slots in (1, 2, 4):
            continuous = policy.generate(QUEUE, max_new_tokens=40, slots=slots, **sampling)
            assert continuous.stats["slots"] == slots and continuous.stats["prefills"] > 1
            assert_same_sequences(continuous, static, rel=1e-9)


def test_continuous_batching_keeps_custom_host_policies_per_sequence(tiny_dirs):
    """A custom policy chooses on the host, for each sequence at its own events: the same choices
    whatever the slots."""

    class OddFirst:
        def select(self, cached, block):
            return ([t for t in cached if t % 2] + [t for t in cached if t % 2 == 0])[:block]

    policy = float64_policy(tiny_dirs, "qwen2", eviction_policy=OddFirst())
    end_at_different_steps(policy, QUEUE, 30, temperature=1.0, seed=5)
    static = policy.generate(QUEUE, max_new_tokens=30, temperature=1.0, seed=5)
    assert any(e.tokens != tuple(range(e.step - 6, e.step - 3)) for log in static.eviction_log for e in log)
    continuous = policy.generate(QUEUE, max_new_tokens=30, temperature=1.0, seed=5, slots=2)
    assert_same_sequences(continuous, static, 1e-9)


def test_stop_strings_free_slots_for_waiting_prompts(tiny_dirs):
    policy = float64_policy(tiny_dirs, "llama")
    text = policy.generate(QUEUE[:1], max_new_tokens=30, temperature=0).texts[0]
    static = policy.generate(QUEUE, max_new_tokens=30, temperature=0, stop=[text[3:5]])
    assert static.texts[0].endswith(text[3:5]) and not static.truncated[0]
    continuous = policy.generate(QUEUE, max_new_tokens=30, temperature=0, stop=[text[3:5]], slots=2)
    assert continuous.stats["prefills"] > 1
    assert_same_sequences(continuous, static, rel=1e-9)


def test_one_prompt_a_group_shares_one_prefill_row(tiny_dirs):
    """Identical prompts admitted together (a GRPO group) are prefilled once; each still samples
    from its own stream."""
    policy = float64_policy(tiny_dirs, "qwen3")
    rows = []
    hook = policy.model.register_forward_pre_hook(lambda m, args, kw: rows.append(kw["input_ids"].shape[0]),
                                                  with_kwargs=True)
    res = policy.generate([QUEUE[0]] * 4 + [QUEUE[1]] * 4, max_new_tokens=8, temperature=1.0, seed=1, slots=8)
    hook.remove()
    assert rows[0] == 2  # the prefill: two distinct prompts
    assert len({tuple(c) for c in res.completion_ids[:4]}) > 1


def test_lockstep_decodes_idle_steps_and_joins_other_prefills(tiny_dirs):
    """Under FSDP every forward pass is a collective. A process whose queue is empty keeps decoding
    idle steps until every process is done, and runs a pass that changes nothing when another
    process prefills: what it decoded stays what it decodes alone."""
    policy = float64_policy(tiny_dirs, "llama")
    end_at_different_steps(policy, QUEUE, 30, temperature=1.0, seed=2)
    alone = policy.generate(QUEUE, max_new_tokens=30, temperature=1.0, seed=2, slots=3)
    answers = {"admit": 0, "done": 0}

    def other_process_still_busy(flag: bool) -> bool:
        """The syncs' calls alternate: "does nobody admit?", then "is everybody done?". The other
        process admits at the first 4 syncs and is done at the 9th (step 127: processes in lockstep
        sync every 16 steps and at the token budget, step 29)."""
        kind = "admit" if sum(answers.values()) % 2 == 0 else "done"
        answers[kind] += 1
        return flag and answers[kind] > (4 if kind == "admit" else 8)

    passes = []
    hook = policy.model.register_forward_pre_hook(lambda m, args, kw: passes.append(kw.get("use_cache")),
                                                  with_kwargs=True)
    policy.configure_decoding(lockstep=other_process_still_busy)
    stepped = policy.generate(QUEUE, max_new_tokens=30, temperature=1.0, seed=2, slots=3)
    hook.remove()
    assert answers["done"] == 9 and stepped.stats["decode_steps"] == 8 * 16
    assert passes.count(False) >= 1  # idle prefills
    assert_same_sequences(stepped, alone, rel=1e-9)


def test_slots_must_be_a_positive_integer(tiny_dirs):
    policy = load(tiny_dirs, "llama", CacheConfig(window=8))
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="slots must be an integer >= 1"):
            policy.generate(PROMPTS, max_new_tokens=4, slots=bad)
    assert policy.generate(PROMPTS, max_new_tokens=4, slots=10).stats["slots"] == len(PROMPTS)


def lockstep_policy(directory: str, eos: list[int]) -> Policy:
    """The float32 pte policy of the two-process test, with `eos` ending sequences early."""
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    torch.manual_seed(0)
    policy = Policy(model, byte_tokenizer(), cache=CacheConfig(window=6, evict_ratio=0.5),
                    adapter=AdapterConfig(mode="pte", rank=4, global_tokens=2))
    for w in policy.wrappers:
        torch.nn.init.normal_(w.lora_up, std=0.3)
    policy.model.generation_config.eos_token_id = eos
    return policy


_FSDP_SLOTS_RANK = """
import json, sys
import torch
sys.path.insert(0, {tests!r})
from test_rollout import QUEUE, lockstep_policy
from thoughtfold.training.distributed import DataParallel, shard_base_model
torch.set_num_threads(1)
dp = DataParallel()
policy = lockstep_policy({model!r}, {eos!r})
shard_base_model(policy.model, policy.wrappers)
policy.configure_decoding(lockstep=dp.all)
prompts = QUEUE if dp.rank == 0 else QUEUE[:2]  # rank 1 runs out of prompts first
res = policy.generate(prompts, max_new_tokens=30, temperature=1.0, seed=2, slots=2)
logs = [[e.to_dict() for e in log] for log in res.eviction_log]
out = {{"ids": res.completion_ids, "logprobs": res.logprobs, "logs": logs}}
open({out!r} + f"/rank{{dp.rank}}.json", "w").write(json.dumps(out))
"""


@pytest.mark.slow  # two processes: 20 s to minutes on a shared 2-core CPU
def test_fsdp_processes_with_different_queues_decode_in_lockstep(tmp_path, tiny_dirs):
    """Two gloo processes with the base weights sharded (every forward is a collective), 2 slots
    each, 6 prompts on one and 2 on the other: the second decodes idle steps and joins the first's
    prefills, neither hangs, and each decodes what one unsharded process decodes."""
    from test_trainer import _launch

    probe = lockstep_policy(str(tiny_dirs["llama"]), 256)
    end_at_different_steps(probe, QUEUE, 30, temperature=1.0, seed=2)
    eos = probe.model.generation_config.eos_token_id
    _launch(_FSDP_SLOTS_RANK.format(tests=str(Path(__file__).parent), model=str(tiny_dirs["llama"]), eos=eos,
                                    out=str(tmp_path)))
    for rank, prompts in ((0, QUEUE), (1, QUEUE[:2])):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        want = probe.generate(prompts, max_new_tokens=30, temperature=1.0, seed=2, slots=2)
        assert got["ids"] == want.completion_ids
        assert [[EvictionEvent.from_dict(e) for e in log] for log in got["logs"]] == want.eviction_log
        for a, b in zip(got["logprobs"], want.logprobs, strict=True):
            # float32, sharded against whole weights: the matmuls block differently (measured 1.6e-5 x
            # max |log-prob| with the residual update)
            assert_close_to_scale(a, b, rel=5e-5)
