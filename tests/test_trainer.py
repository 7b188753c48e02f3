"""Trainer tests on tiny random models (CPU, seconds each): GRPO raises a trivially learnable reward in
every mode, replay micro-batches and 2 gloo processes give the full batch's gradient (slow: run with
--runslow), resume after a SIGKILL equals an uninterrupted run, SFT lowers its loss, and bad settings
fail with one clear line."""

from __future__ import annotations

import json
import math
import os
import random
import socket
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import assert_close_to_scale
from thoughtfold import GRPOTrainer, SFTTrainer
from thoughtfold.config import AdapterConfig, CacheConfig, DataConfig, TrainConfig
from thoughtfold.errors import ConfigError, DataError, PromptTooLongError
from thoughtfold.evaluation.fidelity import token_fidelity
from thoughtfold.policy import Policy, concat_rollouts
from thoughtfold.training.checkpoint import list_checkpoints
from thoughtfold.training.distributed import DataParallel
from thoughtfold.training.metrics import read_metrics

PROMPTS = ["abc", "hello", "xyz", "12+3"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine run ~8x faster on one thread (no oversubscription);
    the SIGKILL test's subprocess uses one thread too, so both runs do identical arithmetic."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def low_bytes(prompts, completions, completion_ids, **columns):
    """Fraction of completion tokens that are ASCII bytes: learnable, and dense (rarely zero-std)."""
    return [sum(t < 128 for t in ids) / len(ids) for ids in completion_ids]


def one_step_gradients(trainer) -> list[torch.Tensor]:
    """The (process-summed) gradients of one training step, without the optimizer step."""
    captured = []

    def capture() -> float:
        trainer.dp.sum_gradients(trainer.params)
        captured.extend(p.grad.clone() for p in trainer.params)
        return 0.0

    trainer.optimizer_step = capture
    trainer.train_step(trainer.local_examples())
    return captured


def per_group_generate(trainer, prompts):
    """Rollouts that depend only on their prompt (one generate call per group, seeded by the prompt),
    so that any split of the batch over processes samples the same completions."""
    g, c = trainer.config.num_generations, trainer.config
    return concat_rollouts([
        trainer.policy.generate(prompts[i : i + g], **c.sampling(zlib.crc32(prompts[i].encode())).to_dict(),
                                system_prompt=None)
        for i in range(0, len(prompts), g)
    ])


def ragged_generate(trainer, prompts):
    """`per_group_generate`, each completion then cut to a length set by its prompt and row (5 to 14
    tokens for the test prompts), so processes hold completions of different lengths and replay
    different numbers of segments."""
    out = per_group_generate(trainer, prompts)
    for i, prompt in enumerate(prompts):
        n = 3 * len(prompt) - 4 + i % trainer.config.num_generations
        out.truncated[i] = out.truncated[i] and n >= len(out.completion_ids[i])  # a cut one has ended
        out.completion_ids[i], out.logprobs[i] = out.completion_ids[i][:n], out.logprobs[i][:n]
        out.eviction_log[i] = [e for e in out.eviction_log[i] if e.step <= n - 2]
    return out


def _config(tmp_path: Path, model: Path, mode: str = "pte", window: int | None = 8,
            **overrides) -> TrainConfig:
    base = dict(
        model=str(model), dtype="float32", device="cpu",
        cache=CacheConfig(window=window),
        adapter=AdapterConfig(mode=mode, rank=4, alpha=8.0, global_tokens=4),
        data=DataConfig(system_prompt=None), num_generations=4, prompts_per_step=2,
        max_completion_length=16, temperature=1.0, learning_rate=3e-2, warmup_steps=0, max_steps=12,
        save_steps=0, output_dir=str(tmp_path / "run"), progress=False,
    )
    base.update(overrides)
    return TrainConfig(**base)


def _dataset() -> list[dict]:
    return [{"prompt": p, "answer": ""} for p in PROMPTS]


def grpo_records(config: TrainConfig) -> list[dict]:
    """The metrics log of a whole GRPO run of `config` on the test prompts, rewarded by `low_bytes`."""
    trainer = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())
    return read_metrics(trainer.train()["metrics"])


# --------------------------------------------------------------------------- arguments


def test_unknown_reward_fails_before_the_model_loads(tmp_path):
    config = _config(tmp_path, tmp_path / "no-such-model", rewards=["nonsense"])
    with pytest.raises(ConfigError, match="unknown reward 'nonsense'"):
        GRPOTrainer(args=config, train_dataset=_dataset())


def test_reward_columns_are_checked_before_the_model_loads(tmp_path):
    """A built-in reward's declared columns, or a TRL function's required parameters, must be in the
    data: a one-line error before the model loads, not after the first rollout."""
    config = _config(tmp_path, tmp_path / "no-such-model")
    rows = [{"prompt": "1+1?", "gold": "2"}]
    with pytest.raises(ConfigError, match="reward math_reward reads the 'answer' or 'solution' column, but "
                                          "the rows of train_dataset have gold, prompt"):
        GRPOTrainer(reward_funcs="math", args=config, train_dataset=rows)

    def needs_label(completions, label, **kwargs):
        return [0.0] * len(completions)

    with pytest.raises(ConfigError, match="reward needs_label reads the 'label' column"):
        GRPOTrainer(reward_funcs=[needs_label], args=config, train_dataset=rows)
    with pytest.raises(DataError, match=r"train_dataset row 0: no prompt field \(looked for prompt, problem"):
        GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=[{"text": "1+1?"}])


def test_eval_dataset_rows_are_checked_before_step_one(tmp_path, tiny_dirs):
    """A bad evaluation row fails when the trainer is built, named, not at the first evaluation."""
    config = _config(tmp_path, tiny_dirs["llama"], eval_steps=5)
    bad = [{"prompt": "2+2?", "answer": "4"}, {"prompt": [1, 2, 99999999], "answer": ""}]
    with pytest.raises(DataError, match=r"eval_dataset row 1: .*token id 99999999"):
        GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset(), eval_dataset=bad)
    long = [{"prompt": "x" * 600, "answer": ""}]
    with pytest.raises(PromptTooLongError, match=r"eval_dataset row 0: the prompt has 619 tokens"):
        GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset(), eval_dataset=long)


def test_conversational_rows_train_and_rewards_get_conversational_completions(tmp_path, tiny_dirs):
    """TRL's conversational format: message-list prompts (a `question` column found as files find
    it) go through the chat template, and rewards receive completions as assistant messages."""
    seen = []

    def assistant_only(prompts, completions, **columns):
        seen.extend(completions)
        return [float(len(c[0]["content"]) % 2) for c in completions]

    rows = [{"question": [{"role": "user", "content": p}]} for p in PROMPTS]
    config = _config(tmp_path, tiny_dirs["qwen2"], max_steps=1)
    GRPOTrainer(reward_funcs=assistant_only, args=config, train_dataset=rows).train()
    assert seen and all(c[0]["role"] == "assistant" and isinstance(c[0]["content"], str) for c in seen)


def test_sft_rows_in_trl_formats(tmp_path, tiny_dirs):
    rows = [{"messages": [{"role": "user", "content": "2+2=?"}, {"role": "assistant", "content": "4"}]},
            {"prompt": [{"role": "user", "content": "3+3=?"}], "completion": [{"role": "assistant",
                                                                             "content": "6"}]}]
    config = _config(tmp_path, tiny_dirs["qwen3"], max_steps=1, prompts_per_step=2, rewards=[])
    trainer = SFTTrainer(args=config, train_dataset=rows)
    assert [r["solution"] for r in trainer.dataset] == ["4", "6"]
    assert trainer.dataset[0]["prompt"] == [{"role": "user", "content": "2+2=?"}]
    assert trainer.train()["adapter"].is_dir()
    with pytest.raises(DataError, match="row 0 has no text or token ids in 'solution', 'completion' or "
                                        "'messages'"):
        SFTTrainer(args=_config(tmp_path / "b", tmp_path / "no-model", rewards=[]),
                   train_dataset=[{"prompt": "a", "text": "b"}])


def test_trl_signature_loads_a_model_id_and_takes_the_rewards_once(tmp_path, tiny_dirs):
    """`GRPOTrainer(model, reward_funcs, args, train_dataset)` as in TRL: a model id or path loads with
    args' cache and adapter settings and becomes the run's model; reward_funcs replace args.rewards;
    with no rewards at all it is a one-line error before the model loads."""
    args = _config(tmp_path, tiny_dirs["llama"])
    trainer = GRPOTrainer(str(tiny_dirs["qwen2"]), low_bytes, args, _dataset())
    assert trainer.policy.model.config.model_type == "qwen2"
    assert trainer.config.model == str(tiny_dirs["qwen2"])
    assert (trainer.policy.cache_config, trainer.policy.adapter_config) == (args.cache, args.adapter)
    assert trainer.reward_names == ["low_bytes"]
    no_rewards = _config(tmp_path / "other", tmp_path / "no-such-model", rewards=[])
    with pytest.raises(ConfigError, match="no rewards: pass reward_funcs or set rewards"):
        GRPOTrainer(args=no_rewards, train_dataset=_dataset())
    with pytest.raises(ConfigError, match="model must be a thoughtfold Policy, a model id or path"):
        GRPOTrainer(trainer.policy.model, low_bytes, args, _dataset())


def test_mode_none_has_nothing_to_train(tmp_path, tiny_dirs):
    with pytest.raises(ConfigError, match="nothing to train"):
        GRPOTrainer(reward_funcs=low_bytes, args=_config(tmp_path, tiny_dirs["llama"], mode="none"),
                    train_dataset=_dataset())


# --------------------------------------------------------------------------- GRPO learns


@pytest.mark.parametrize("mode, window, backprop", [("pte", 8, "truncated"), ("pte", 8, "state"),
                                                    ("lora", 8, "truncated"), ("lora", None, "truncated")],
                         ids=["pte-bounded", "pte-bounded-state-backprop", "lora-bounded", "lora-full"])
def test_grpo_raises_a_learnable_reward(tmp_path, tiny_dirs, mode, window, backprop):
    # 12 steps of 8 rollouts are few: whether the margin below is reached depends on the sampled
    # completions (one seed in a handful reaches it in all four modes; this is one)
    config = _config(tmp_path, tiny_dirs["llama"], mode=mode, window=window, backprop=backprop, seed=5)
    result = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset()).train()
    records = read_metrics(result["metrics"])
    assert [r["step"] for r in records] == list(range(1, 13))
    rewards = [r["reward"] for r in records]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.15, rewards
    expected_evictions = window is not None
    assert (records[0]["evictions_per_rollout"] > 0) == expected_evictions
    for key in ("reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/clipped_ratio",
                "grad_norm", "learning_rate", "peak_memory_gb", "rollout_tokens_per_s",
                "rewards/low_bytes/mean"):
        assert key in records[0]
    assert result["plot"].is_file() and (result["adapter"] / "adapter.safetensors").is_file()


def test_groups_without_reward_spread_leave_the_adapter_unchanged(tmp_path, tiny_dirs):
    def constant(prompts, completions, **columns):
        return [1.0] * len(completions)

    config = _config(tmp_path, tiny_dirs["llama"], max_steps=2)
    trainer = GRPOTrainer(reward_funcs=constant, args=config, train_dataset=_dataset())
    before = [p.detach().clone() for p in trainer.params]
    records = read_metrics(trainer.train()["metrics"])
    assert [(r["frac_reward_zero_std"], r["grad_norm"], r["loss"]) for r in records] == [(1.0, 0.0, 0.0)] * 2
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))


def test_beta_logs_kl_against_the_adapter_free_model(tmp_path, tiny_dirs):
    config = _config(tmp_path, tiny_dirs["qwen2"], max_steps=2, beta=0.1, loss_type="grpo")
    records = grpo_records(config)
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # A = 0 at init: the policy is the reference
    assert records[1]["kl"] > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_replay_micro_batches_accumulate_the_full_batch_gradient(tmp_path, tiny_dirs, loss_type):
    """Batch-wide loss weights: 3-row micro-batches sum to exactly the full batch's gradient."""
    grads = []
    for size in (None, 3):
        config = _config(tmp_path, tiny_dirs["llama"], loss_type=loss_type, replay_batch_size=size)
        trainer = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())
        grads.append(one_step_gradients(trainer))
    assert any(g.abs().max() > 0 for g in grads[0])
    for full, micro in zip(*grads, strict=True):
        assert_close_to_scale(micro, full, rel=1e-5)


def replay_losses(trainer) -> list[float]:
    """The loss of each replay micro-batch `trainer` runs from now on, in order."""
    losses, inner = [], trainer._replay_loss

    def replay_loss(batch):
        loss, stats = inner(batch)
        losses.append(loss)
        return loss, stats

    trainer._replay_loss = replay_loss
    return losses


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo"])
def test_memory_budget_splits_replays_without_changing_loss_or_gradients(tmp_path, tiny_dirs, loss_type):
    """A replay_memory_gb that holds one row per replay gives the loss and gradients of replaying the
    whole batch at once (bnpo included: its normalisation follows replay_batch_size only)."""
    runs = []
    for budget in (None, 1e-4):
        config = _config(tmp_path, tiny_dirs["llama"], loss_type=loss_type, replay_memory_gb=budget)
        trainer = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())
        if budget is not None:
            assert trainer.replays.rows_per_replay(prompt_tokens=4, width=2) == 1
        losses = replay_losses(trainer)
        runs.append((one_step_gradients(trainer), sum(losses), len(losses)))
    (full_grads, full_loss, one), (split_grads, split_loss, many) = runs
    assert one == 1 and many > 1 and any(g.abs().max() > 0 for g in full_grads)
    assert split_loss == pytest.approx(full_loss, rel=1e-5, abs=1e-7)
    for full, split in zip(full_grads, split_grads, strict=True):
        assert_close_to_scale(split, full, rel=1e-5)


def test_generation_batch_size_slots_sample_what_one_batch_samples(tmp_path, tiny_dirs):
    """GRPO rollouts decode generation_batch_size slots at once, with continuous batching: the same
    completions and log-probs as every row at once (each row samples from its own stream)."""
    results = []
    for slots in (None, 3):
        config = _config(tmp_path, tiny_dirs["qwen2"], generation_batch_size=slots)
        trainer = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())
        results.append(trainer.generate([p for p in PROMPTS[:2] for _ in range(4)]))
    static, continuous = results
    assert static.stats["slots"] == 8 and continuous.stats["slots"] == 3
    assert continuous.completion_ids == static.completion_ids
    for a, b in zip(continuous.logprobs, static.logprobs, strict=True):
        assert a == pytest.approx(b, abs=1e-5)


def test_num_iterations_and_warmup_tick_the_schedule_per_update(tmp_path, tiny_dirs):
    config = _config(tmp_path, tiny_dirs["llama"], max_steps=2, num_iterations=2, lr_scheduler_type="linear",
                     warmup_steps=1, loss_type="dr_grpo", mask_truncated_completions=True)
    records = grpo_records(config)
    # 4 updates, 2 of warmup: the lr before each step's first update is 0, then the peak
    assert [r["learning_rate"] for r in records] == pytest.approx([0.0, 3e-2])


def test_logging_steps_writes_a_mean_line_every_n_steps_and_at_checkpoints(tmp_path, tiny_dirs):
    """logging_steps=2 with save_steps=3 over 5 steps: lines at 2, 3 (a checkpoint), 4 and 5 (the last)."""
    config = _config(tmp_path, tiny_dirs["llama"], max_steps=5, logging_steps=2, save_steps=3,
                     num_generations=2, prompts_per_step=1, max_completion_length=8)
    records = grpo_records(config)
    assert [r["step"] for r in records] == [2, 3, 4, 5]


# --------------------------------------------------------------------------- checkpoints


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter" / "adapter.safetensors"))


_KILLED_RUN = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_trainer import _config, _dataset, low_bytes
from thoughtfold import GRPOTrainer
from thoughtfold.config import CacheConfig
calls = 0
def low_bytes_then_die(prompts, completions, completion_ids, **columns):
    global calls
    calls += 1
    if calls == 4:  # in the middle of step 4: step 3 is logged but not checkpointed
        os.kill(os.getpid(), signal.SIGKILL)
    return low_bytes(prompts, completions, completion_ids)
low_bytes_then_die.__name__ = "low_bytes"
config = _config(Path({tmp!r}), Path({model!r}), output_dir={out!r}, max_steps=4, save_steps=2,
                 cache=CacheConfig(window=8, eviction={eviction!r}))
GRPOTrainer(reward_funcs=low_bytes_then_die, args=config, train_dataset=_dataset()).train()
"""


@pytest.mark.parametrize("eviction", ["oldest", "headkv"])  # headkv: the calibrated head weights resume too
def test_resume_after_sigkill_equals_an_uninterrupted_run(tmp_path, tiny_dirs, eviction):
    model, cache = tiny_dirs["llama"], CacheConfig(window=8, eviction=eviction)
    straight = _config(tmp_path, model, output_dir=str(tmp_path / "straight"), max_steps=4, save_steps=2,
                       cache=cache)
    GRPOTrainer(reward_funcs=low_bytes, args=straight, train_dataset=_dataset()).train()

    killed = tmp_path / "killed"
    script = _KILLED_RUN.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), model=str(model),
                                out=str(killed), eviction=eviction)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert list_checkpoints(killed / "checkpoints")[-1].name == "step-00000002"
    assert [r["step"] for r in read_metrics(killed / "metrics.jsonl")] == [1, 2, 3]

    resumed = _config(tmp_path, model, output_dir=str(killed), max_steps=4, save_steps=2, resume=True,
                      cache=cache)
    trainer = GRPOTrainer(reward_funcs=low_bytes, args=resumed, train_dataset=_dataset())
    assert (trainer.step, trainer.data_pos) == (2, 4)
    trainer.train()

    a, b = _adapter(tmp_path / "straight"), _adapter(killed)
    assert a.keys() == b.keys() and ("eviction.head_weights" in a) == (eviction == "headkv")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _deterministic(killed / "metrics.jsonl") == _deterministic(tmp_path / "straight" / "metrics.jsonl")


def _deterministic(path: Path) -> list[dict]:
    """Metrics without the timing/memory ones, which differ between runs."""
    volatile = {"step_seconds", "peak_memory_gb", "rollout_tokens_per_s"}
    return [{k: v for k, v in r.items() if k not in volatile} for r in read_metrics(path)]


_DDP_RANK = """
import sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from test_trainer import _config, _dataset, low_bytes, one_step_gradients, per_group_generate
from thoughtfold import GRPOTrainer
torch.set_num_threads(1)
GRPOTrainer.generate = per_group_generate
for loss_type in {loss_types!r}:
    config = _config(Path({tmp!r}), Path({model!r}), prompts_per_step=2, loss_type=loss_type,
                     output_dir={out!r})
    trainer = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())
    assert trainer.dp.world == 2
    grads = one_step_gradients(trainer)
    torch.save(grads, {out!r} + f"/grads-{{loss_type}}-{{trainer.dp.rank}}.pt")
config = _config(Path({tmp!r}), Path({model!r}), max_steps=2, save_steps=1, output_dir={out!r} + "/run")
GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset()).train()
"""
DDP_LOSS_TYPES = ("grpo", "dapo")  # per-sequence and per-token normalisers, both over the global batch


@pytest.mark.slow  # two training processes: 20 s to minutes on a shared 2-core CPU
def test_two_gloo_processes_match_one_process_with_the_doubled_batch(tmp_path, tiny_dirs, monkeypatch):
    model, out = tiny_dirs["llama"], tmp_path / "ddp"
    out.mkdir()
    _launch(_DDP_RANK.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), model=str(model),
                             out=str(out), loss_types=DDP_LOSS_TYPES))
    assert [r["step"] for r in read_metrics(out / "run" / "metrics.jsonl")] == [1, 2]  # written once
    assert list_checkpoints(out / "run" / "checkpoints")[-1].name == "step-00000002"

    monkeypatch.setattr(GRPOTrainer, "generate", per_group_generate)
    for loss_type in DDP_LOSS_TYPES:
        config = _config(tmp_path, model, prompts_per_step=4, loss_type=loss_type)
        single = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())
        assert_rank_gradients(out, f"grads-{loss_type}-{{rank}}.pt", one_step_gradients(single), rel=1e-5)


def _launch(script: str, world: int = 2) -> None:
    """Run `script` in `world` gloo processes (what torchrun sets up) and wait for all of them."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
                              "WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
        for rank in range(world)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]


def assert_rank_gradients(out: Path, name: str, expected: list[torch.Tensor], rel: float) -> None:
    """Each process's saved gradients (`name` formatted with its rank) equal the expected ones."""
    assert any(g.abs().max() > 0 for g in expected)
    for rank in range(2):
        got = torch.load(out / name.format(rank=rank))
        for a, b in zip(got, expected, strict=True):
            assert_close_to_scale(a, b, rel=rel)


_FSDP_RANK = """
import sys
from pathlib import Path
import torch
from torch.distributed.tensor import DTensor
sys.path.insert(0, {tests!r})
from test_trainer import SFT_TRACES, _config, _dataset, low_bytes, one_step_gradients, ragged_generate
from thoughtfold import GRPOTrainer, SFTTrainer
torch.set_num_threads(1)
real_generate = GRPOTrainer.generate
GRPOTrainer.generate = ragged_generate
config = _config(Path({tmp!r}), Path({model!r}), prompts_per_step=2, output_dir={out!r}, fsdp=True,
                 replay_batch_size=2, beta=0.05, backprop="state")
trainer = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())
weight = trainer.policy.model.model.layers[0].mlp.down_proj.base.weight
assert isinstance(weight, DTensor) and weight.to_local().shape[0] < weight.shape[0]  # really sharded
torch.save(one_step_gradients(trainer), {out!r} + f"/grads-{{trainer.dp.rank}}.pt")
GRPOTrainer.generate = real_generate  # real rollouts: ranks finish decoding at different steps
config = _config(Path({tmp!r}), Path({model!r}), max_steps=2, save_steps=1, output_dir={out!r} + "/run",
                 fsdp=True)
GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset()).train()
config = _config(Path({tmp!r}), Path({model!r}), max_steps=1, prompts_per_step=1, max_completion_length=24,
                 fsdp=True, output_dir={out!r} + "/sft")
SFTTrainer(args=config, train_dataset=SFT_TRACES).train()  # one short and one long trace: one per process
"""
SFT_TRACES = [{"prompt": "2+2=?", "answer": "4", "solution": "4"},
              {"prompt": "spell cat", "answer": "cat", "solution": "c, then a, then t: the word is cat"}]


@pytest.mark.slow  # two training processes: 20 s to minutes on a shared 2-core CPU
def test_fsdp_shards_the_base_and_matches_one_process(tmp_path, tiny_dirs, monkeypatch):
    """2 gloo processes with the base weights sharded (FSDP2): the gradients of one GRPO step (state
    backprop, KL reference, micro-batches, ranks with different completion lengths) equal one
    process on the doubled batch; real rollouts end together and a run checkpoints."""
    model, out = tiny_dirs["llama"], tmp_path / "fsdp"
    out.mkdir()
    _launch(_FSDP_RANK.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), model=str(model),
                              out=str(out)))
    assert list_checkpoints(out / "run" / "checkpoints")[-1].name == "step-00000002"

    monkeypatch.setattr(GRPOTrainer, "generate", ragged_generate)
    config = _config(tmp_path, model, prompts_per_step=4, replay_batch_size=2, beta=0.05, backprop="state")
    single = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())
    assert_rank_gradients(out, "grads-{rank}.pt", one_step_gradients(single), rel=1e-5)
    # SFT: the sharded first-step loss over both processes' traces is one process's loss on both
    sft = SFTTrainer(args=_config(tmp_path, model, max_steps=1, prompts_per_step=2, max_completion_length=24,
                                  output_dir=str(tmp_path / "sft1")), train_dataset=SFT_TRACES).train()
    (one,), (two,) = read_metrics(sft["metrics"]), read_metrics(out / "sft" / "metrics.jsonl")
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-5) and two["num_tokens"] == one["num_tokens"]


_FSDP_IDLE_RANK = """
import json, sys
from pathlib import Path
import torch
sys.path.insert(0, {tests!r})
from test_trainer import IDLE_TRACES, _config
from thoughtfold import SFTTrainer
torch.set_num_threads(1)
config = _config(Path({tmp!r}), Path({model!r}), max_steps=1, max_completion_length=24, fsdp=True,
                 replay_batch_size=1, output_dir={out!r} + "/idle")
trainer = SFTTrainer(args=config, train_dataset=IDLE_TRACES)
mine = IDLE_TRACES[:2] if trainer.dp.rank == 0 else IDLE_TRACES[2:]  # rank 1 runs out of rows first
Path({out!r}, f"idle-{{trainer.dp.rank}}.json").write_text(json.dumps(trainer.train_step(mine)))
"""
IDLE_TRACES = [*SFT_TRACES, {"prompt": "count to 3", "answer": "3", "solution": "1, 2, 3"}]


@pytest.mark.slow  # two training processes: 20 s to minutes on a shared 2-core CPU
def test_fsdp_process_with_fewer_micro_batches_runs_idle_replays(tmp_path, tiny_dirs):
    """Under FSDP every forward is a collective: a process with fewer micro-batches (here 1 against
    2) replays a zero-loss padding sequence while the other replays its last one, so neither hangs,
    and the loss over both processes is one process's loss on all the traces."""
    model, out = tiny_dirs["llama"], tmp_path / "fsdp"
    out.mkdir()
    _launch(_FSDP_IDLE_RANK.format(tests=str(Path(__file__).parent), tmp=str(tmp_path), model=str(model),
                                   out=str(out)))
    config = _config(tmp_path, model, max_steps=1, max_completion_length=24, replay_batch_size=1,
                     output_dir=str(tmp_path / "single"))
    one = SFTTrainer(args=config, train_dataset=IDLE_TRACES).train_step(IDLE_TRACES)
    for rank in range(2):
        two = json.loads((out / f"idle-{rank}.json").read_text())
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-5) and two["num_tokens"] == one["num_tokens"]


def test_fresh_run_refuses_to_mix_with_old_checkpoints(tmp_path, tiny_dirs):
    """Training into a directory with checkpoints is refused unless it resumes: by resume=true, or
    as TRL does it, by train(resume_from_checkpoint=True) on a trainer built without it."""
    config = _config(tmp_path, tiny_dirs["llama"], max_steps=2, save_steps=1)
    GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset()).train()
    with pytest.raises(ConfigError, match=r"resume=true \(or call train\(resume_from_checkpoint=True\)\)"):
        GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset()).train()
    again = _config(tmp_path, tiny_dirs["llama"], max_steps=1, overwrite_output_dir=True)
    GRPOTrainer(reward_funcs=low_bytes, args=again, train_dataset=_dataset()).train()
    # the old run's step-2 checkpoint is gone: resuming must not jump ahead of the new run
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-00000001"]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]


# --------------------------------------------------------------------------- SFT


def test_sft_lowers_the_loss_on_a_fixed_trace(tmp_path, tiny_dirs):
    trace = [{"prompt": "2+2=?", "answer": "4", "solution": "two plus two is 4. \\boxed{4}"}]
    config = _config(tmp_path, tiny_dirs["qwen3"], max_steps=8, max_completion_length=24, prompts_per_step=1,
                     rewards=[])  # SFT needs none
    result = SFTTrainer(args=config, train_dataset=trace).train()
    losses = [r["loss"] for r in read_metrics(result["metrics"])]
    assert losses[-1] < 0.75 * losses[0] and losses[-1] < min(losses[:-1]), losses
    assert result["plot"].name == "loss.png"


def test_sft_imitates_full_cache_traces_under_the_bounded_cache(tmp_path, tiny_dirs):
    """Near-greedy base-model traces (fresh each step) get likelier under the bounded-cache policy."""
    config = _config(tmp_path, tiny_dirs["llama"], max_steps=8, max_completion_length=24,
                     sft_targets="full_cache", temperature=0.1, learning_rate=1e-2)
    records = read_metrics(SFTTrainer(args=config, train_dataset=_dataset()[:1]).train()["metrics"])
    losses = [r["loss"] for r in records]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3, losses
    assert all(r["num_tokens"] > 0 for r in records)


def test_sft_under_scored_eviction_replays_the_policys_own_choices(tmp_path, tiny_dirs):
    """The SFT loss of a target under snapkv is the NLL with the evictions the policy makes while
    decoding that target (a teacher-forced pass), not the oldest-block schedule's."""
    prompt, target = [5, 17, 99, 3], list(range(40, 80))
    config = _config(tmp_path, tiny_dirs["qwen2"], cache=CacheConfig(window=6, eviction="snapkv"),
                     max_steps=1, max_completion_length=40, prompts_per_step=1)
    trainer = SFTTrainer(args=config, train_dataset=[{"prompt": prompt, "solution": target}])
    torch.manual_seed(0)
    for w in trainer.policy.wrappers:  # non-zero adapters: what is evicted changes the outputs
        torch.nn.init.normal_(w.lora_up, std=0.3)
    logs = trainer.policy.eviction_logs([prompt], [target])
    assert len(logs[0]) >= 3 and all(e.layers is not None for e in logs[0])
    with torch.no_grad():
        expected = -trainer.policy.replay_logprobs([prompt], [target], logs)[0].mean().item()
        oldest = -trainer.policy.replay_logprobs([prompt], [target])[0].mean().item()
    loss = read_metrics(trainer.train()["metrics"])[0]["loss"]
    assert loss == pytest.approx(expected, rel=1e-5) and abs(loss - oldest) > 1e-3


@pytest.mark.parametrize("top_k", [None, 3])
def test_sft_kl_loss_is_the_kl_to_the_full_cache_model_after_the_first_eviction(tmp_path, tiny_dirs, top_k):
    """`sft_loss: kl`: the first step's loss (before any update) is the mean per-token KL from the
    full-cache base model to the bounded policy over the tokens after each row's first eviction,
    what `token_fidelity` measures (exactly with the whole vocabulary, and training lowers it; a
    lower bound with top-k)."""
    targets = [list(range(40, 70)), list(range(90, 112))]
    rows = [{"prompt": [5, 17, 99, 3], "solution": targets[0]}, {"prompt": [11, 12], "solution": targets[1]}]
    config = _config(tmp_path, tiny_dirs["llama"], window=6, max_steps=1 if top_k else 6,
                     max_completion_length=40, prompts_per_step=2, sft_loss="kl", distill_top_k=top_k,
                     learning_rate=5e-2,
                     adapter=AdapterConfig(mode="pte", rank=4, alpha=8.0, global_tokens=4, residual=True))
    trainer = SFTTrainer(args=config, train_dataset=rows)
    torch.manual_seed(0)
    for w in trainer.policy.wrappers:  # a bounded policy that differs from its base model
        torch.nn.init.normal_(w.lora_up, std=0.3)
    prompts = [r["prompt"] for r in rows]
    expected = token_fidelity({"p": trainer.policy}, trainer.policy, prompts, targets)["p"]
    records = read_metrics(trainer.train()["metrics"])
    assert records[0]["num_tokens"] == expected.tokens
    if top_k is None:
        assert records[0]["loss"] == pytest.approx(expected.kl_after_eviction, rel=1e-4)
        assert records[-1]["loss"] < 0.9 * records[0]["loss"], [r["loss"] for r in records]
    else:
        assert 0 < records[0]["loss"] < expected.kl_after_eviction


def test_sft_kl_after_eviction_needs_a_bounded_cache(tmp_path, tiny_dirs):
    with pytest.raises(ConfigError, match="needs a bounded cache"):
        _config(tmp_path, tiny_dirs["llama"], window=None, sft_loss="kl")
    _config(tmp_path, tiny_dirs["llama"], window=None, sft_loss="kl", distill_tokens="all")


def test_encoder_gets_its_own_learning_rate_and_the_schedule_scales_both(tmp_path, tiny_dirs):
    config = _config(tmp_path, tiny_dirs["llama"], encoder_lr_ratio=4.0, learning_rate=1e-2, warmup_steps=2,
                     max_steps=2)
    trainer = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())
    adapters, encoder = trainer.optimizer.param_groups
    assert {id(p) for p in encoder["params"]} == {id(p) for p in trainer.policy.encoder.parameters()}
    assert len(adapters["params"]) == 2 * len(trainer.policy.wrappers)
    assert adapters["initial_lr"] == 1e-2
    assert encoder["initial_lr"] == pytest.approx(4 * adapters["initial_lr"])
    trainer.optimizer.step()
    trainer.scheduler.step()  # halfway through the warm-up: both at half their rate
    assert encoder["lr"] == pytest.approx(2e-2) and adapters["lr"] == pytest.approx(5e-3)
    lora = GRPOTrainer(reward_funcs=low_bytes, args=_config(tmp_path / "l", tiny_dirs["llama"], "lora"),
                       train_dataset=_dataset())
    assert len(lora.optimizer.param_groups) == 1


def test_metrics_hold_the_diagnostics_per_parameter_group_and_layer(tmp_path, tiny_dirs):
    config = _config(tmp_path, tiny_dirs["qwen3"], max_steps=2)
    trainer = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())
    records = read_metrics(trainer.train()["metrics"])
    for group in ("adapter_down", "adapter_up", "encoder"):
        assert records[-1][f"diag/grad_norm/{group}"] > 0 and records[-1][f"diag/update_norm/{group}"] > 0
    assert "diag/rel_change/adapter_up" not in records[-1]  # it starts at zero
    assert 0 < records[-1]["diag/rel_change/encoder"] < 1
    assert records[0]["diag/update_norm/adapter_up"] > 0  # after the first update
    for layer in ("l00", "l01"):
        assert records[-1][f"diag/state_rms/{layer}"] > 0
        assert 0 < records[-1][f"diag/global_share/{layer}"] <= 1


def test_state_diagnostics_cover_every_replay_micro_batch(tmp_path, tiny_dirs):
    """Two rows per replay give the state metrics of replaying the whole batch of eight at once, not
    those of the last two rows."""
    records = []
    for size in (None, 2):
        config = _config(tmp_path, tiny_dirs["qwen3"], max_steps=1, replay_batch_size=size,
                         output_dir=str(tmp_path / f"run-{size}"))
        trainer = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())
        records.append(read_metrics(trainer.train()["metrics"])[0])
    keys = [k for k in records[0] if k.startswith(("diag/state_rms/", "diag/global_share/"))]
    assert len(keys) == 4
    for key in keys:
        assert records[1][key] == pytest.approx(records[0][key], rel=1e-5)


def test_sft_needs_the_trace_column(tmp_path, tiny_dirs):
    with pytest.raises(DataError, match="'solution'"):
        SFTTrainer(args=_config(tmp_path, tiny_dirs["llama"]), train_dataset=_dataset())


def test_metrics_go_to_json_lines_and_tensorboard(tmp_path, tiny_dirs):
    pytest.importorskip("tensorboard")
    config = _config(tmp_path, tiny_dirs["llama"], max_steps=1, report_to=["tensorboard"])
    result = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset()).train()
    lines = Path(result["metrics"]).read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["step"] == 1
    assert list((tmp_path / "run" / "tensorboard").glob("events.out.tfevents.*"))


def test_bf16_model_trains_with_fp32_adapter_and_encoder(tmp_path, tiny_dirs):
    """Mixed precision as on a GPU: the base model in bf16, the trainable adapter and encoder
    weights kept in fp32 (updates too small for bf16 are not lost), finite losses and gradients."""
    config = _config(tmp_path, tiny_dirs["qwen2"], dtype="bfloat16", max_steps=3)
    trainer = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())
    assert trainer.policy.model.dtype == torch.bfloat16
    before = [p.detach().clone() for p in trainer.params]
    assert all(p.dtype == torch.float32 for p in before)
    records = read_metrics(trainer.train()["metrics"])
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records)
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.params, strict=True))


# --------------------------------------------------------------------------- gradients across evictions


def _last_token_only(tmp_path, tiny_dirs, backprop: str) -> GRPOTrainer:
    """A GRPO trainer whose loss is the last completion token alone (`loss_mask_prefix` masks the
    15 before it; the random model never ends early), under a 4-token window: that token is decoded
    after 12 eviction events, long after the global tokens made the state before the first one.
    The adapters' up-projections (B, zero at init) are made non-zero, as after some training."""
    rows = [{"prompt": p, "answer": "", "loss_mask_prefix": 15} for p in PROMPTS]
    config = _config(tmp_path, tiny_dirs["llama"], window=4, backprop=backprop, filter_zero_std=False)
    trainer = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=rows)
    torch.manual_seed(1)
    with torch.no_grad():  # B is zero at init, which gives the state no gradient at all
        for w in trainer.policy.wrappers:
            w.lora_up.normal_(0, 0.3)
    return trainer


def test_default_backprop_carries_the_last_tokens_loss_back_past_the_first_eviction(tmp_path, tiny_dirs):
    """With the default `backprop` ("state") the loss of the last token reaches the encoder's
    global tokens, which only the state before the first eviction reads directly; `truncated` cuts
    the chain at every event, so they get exactly no gradient (it cannot learn recall)."""
    assert TrainConfig().backprop == "state"
    grads = {}
    for backprop in ("state", "truncated"):
        trainer = _last_token_only(tmp_path / backprop, tiny_dirs, backprop)
        names = [n for n, _ in trainer.policy.encoder.named_parameters()]
        grads[backprop] = dict(zip(names, one_step_gradients(trainer)[-len(names):], strict=True))
    global_tokens = [n for n in grads["state"] if "global" in n]
    assert global_tokens
    for name in global_tokens:
        assert grads["state"][name].abs().max() > 0, name
        assert grads["truncated"][name].abs().max() == 0, name
    # it does train the last block's encoding
    assert any(g.abs().max() > 0 for g in grads["truncated"].values())


def test_loss_mask_prefix_keeps_leading_tokens_out_of_the_loss(tmp_path, tiny_dirs):
    def grads(prefix: int) -> list[torch.Tensor]:
        rows = [{"prompt": p, "answer": "", "loss_mask_prefix": prefix} for p in PROMPTS]
        config = _config(tmp_path / str(prefix), tiny_dirs["qwen2"], filter_zero_std=False)
        return one_step_gradients(GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=rows))

    none, first, everything = grads(0), grads(1), grads(16)
    assert all(g.abs().max() == 0 for g in everything)
    assert any(g.abs().max() > 0 for g in first)
    assert any(not torch.allclose(a, b) for a, b in zip(none, first, strict=True))
    with pytest.raises(DataError, match="loss_mask_prefix must be a whole number"):
        GRPOTrainer(reward_funcs=low_bytes, args=_config(tmp_path / "bad", tiny_dirs["qwen2"]),
                    train_dataset=[{"prompt": "x", "answer": "", "loss_mask_prefix": -1}]).train_step(
                        [{"prompt": "x", "answer": "", "loss_mask_prefix": -1}])


class RandomBlock:
    """Evicts a random run of `block` cached tokens. Its RNG advances across rollouts, so the
    `generation_batch_size` chunks of one step record different eviction schedules."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)

    def select(self, cached, block):
        start = self.rng.randrange(len(cached) - block + 1)
        return list(cached[start : start + block])


def test_grpo_loss_with_per_row_eviction_schedules_equals_row_by_row(tmp_path, tiny_dirs):
    """Rows whose logs differ are replayed group by group; the loss must index its per-row tensors
    by the rows it is handed (it once broadcast one row against the whole batch)."""
    policy = Policy.from_pretrained(tiny_dirs["llama"], cache=CacheConfig(window=6, evict_ratio=0.5),
                                    adapter=AdapterConfig(mode="pte", rank=4, alpha=8.0, global_tokens=4,
                                                          residual=False),
                                    eviction_policy=RandomBlock(0), dtype="float32", device="cpu")
    trainer = GRPOTrainer(policy, low_bytes, _config(tmp_path, tiny_dirs["llama"], generation_batch_size=2,
                                                     prompts_per_step=1), _dataset())
    for w in policy.wrappers:
        torch.nn.init.normal_(w.lora_up, std=0.1)
    rollout = trainer.generate(["abc"] * 4)
    logs = rollout.eviction_log
    assert all(len(log) >= 2 for log in logs) and logs[0][:2] != logs[2][:2]
    replayed = policy.replay_logprobs(rollout.prompt_ids, rollout.completion_ids, logs)
    for ours, ref in zip(replayed, rollout.logprobs, strict=True):
        assert (ours - torch.tensor(ref)).abs().max() <= 1e-4
    lengths = [len(c) for c in rollout.completion_ids]
    width = max(lengths)
    weights = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).float() / sum(lengths)
    batch = trainer._policy_batch(rollout, torch.tensor([1.0, -0.5, 0.25, -2.0]), [0, 1, 2, 3], weights)

    def grads(spans):
        trainer.optimizer.zero_grad(set_to_none=True)
        loss = sum(trainer._replay_loss(batch.rows(a, b))[0] for a, b in spans)
        return loss, [p.grad.clone() for p in trainer.params]

    loss, together = grads([(0, 4)])
    loss_rows, by_row = grads([(i, i + 1) for i in range(4)])
    assert loss == pytest.approx(loss_rows, rel=1e-5)
    for a, b in zip(together, by_row, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_fsdp_refuses_a_custom_eviction_policy(tmp_path, tiny_dirs, monkeypatch):
    def two_processes(self):
        self.rank, self.world = 0, 2

    monkeypatch.setattr(DataParallel, "__init__", two_processes)
    policy = Policy.from_pretrained(tiny_dirs["llama"], eviction_policy=RandomBlock(0), device="cpu")
    with pytest.raises(ConfigError, match="custom eviction_policy: train without fsdp"):
        GRPOTrainer(policy, low_bytes, _config(tmp_path, tiny_dirs["llama"], fsdp=True), _dataset())
    scored = _config(tmp_path, tiny_dirs["llama"], fsdp=True, cache=CacheConfig(window=8, eviction="h2o"))
    with pytest.raises(ConfigError, match="cache.eviction is h2o: train without fsdp"):
        GRPOTrainer(reward_funcs=low_bytes, args=scored, train_dataset=_dataset())


def test_grpo_trains_under_scored_eviction(tmp_path, tiny_dirs):
    """headkv through the trainer: the policy calibrates its head weights on the first rollout,
    rows carry per-layer eviction logs, and the step's gradient reaches the encoder."""
    config = _config(tmp_path, tiny_dirs["qwen2"], cache=CacheConfig(window=6, eviction="headkv"),
                     max_completion_length=20)
    trainer = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())
    torch.manual_seed(0)
    for w in trainer.policy.wrappers:  # non-zero adapters: the loss then depends on the state
        torch.nn.init.normal_(w.lora_up, std=0.3)
    grads = one_step_gradients(trainer)
    assert trainer.policy.head_weights is not None
    assert trainer.policy.head_weights.shape == (2, 2)
    encoder = [g for g, p in zip(grads, trainer.params, strict=True)
               if any(p is q for q in trainer.policy.encoder.parameters())]
    assert encoder and all(torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in encoder)


# --------------------------------------------------------------------------- what a paranoid user tries


def test_two_runs_cannot_share_an_output_dir(tmp_path, tiny_dirs):
    """A second process training into the same output_dir is refused before its model loads."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys
            from thoughtfold.persist import lock_directory
            lock = lock_directory({str(out)!r}, "training run")
            print("locked", flush=True)
            sys.stdin.read()
        """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = _config(tmp_path, tmp_path / "no-such-model", max_steps=1)
        with pytest.raises(ConfigError, match=rf"{out} is in use by another training run \(training run pid"):
            GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())
    finally:
        holder.communicate("", timeout=60)
    config = _config(tmp_path, tiny_dirs["llama"], max_steps=1)
    GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset()).train()  # free once it exits


def test_unwritable_output_dir_fails_before_the_model_loads(tmp_path):
    (tmp_path / "file").write_text("")
    config = _config(tmp_path, tmp_path / "no-such-model", output_dir=str(tmp_path / "file" / "run"))
    with pytest.raises(ConfigError, match="cannot write to the output directory"):
        GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())


def test_resume_skips_a_corrupt_checkpoint_and_refuses_when_none_is_intact(tmp_path, tiny_dirs, caplog):
    config = _config(tmp_path, tiny_dirs["llama"], max_steps=2, save_steps=1)
    GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset()).train()
    checkpoints = tmp_path / "run" / "checkpoints"
    weights = checkpoints / "step-00000002" / "adapter" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a copy cut short
    resume = _config(tmp_path, tiny_dirs["llama"], max_steps=3, save_steps=1, resume=True)
    trainer = GRPOTrainer(reward_funcs=low_bytes, args=resume, train_dataset=_dataset())
    assert trainer.step == 1
    assert "step-00000002 is damaged" in caplog.text and "truncated or corrupt" in caplog.text
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step-00000001"]  # the bad one moved aside
    (checkpoints / "step-00000001" / "trainer_state.pt").write_bytes(b"garbage")
    with pytest.raises(ConfigError, match="none of the 1 checkpoints .* is intact"):
        GRPOTrainer(reward_funcs=low_bytes, args=resume, train_dataset=_dataset())


def test_reward_returning_strings_is_a_config_error(tmp_path, tiny_dirs):
    def words(prompts, completions, **columns):
        return ["good"] * len(completions)

    trainer = GRPOTrainer(reward_funcs=words, args=_config(tmp_path, tiny_dirs["llama"], max_steps=1),
                          train_dataset=_dataset())
    with pytest.raises(ConfigError, match=r"reward words returned 'good' \(str\)"):
        trainer.train()


def flat_for_abc(prompts, completions, completion_ids, **columns):
    """`low_bytes`, except that the "abc" group always scores 1: a zero-std group in every batch."""
    return [1.0 if p == "abc" else r for p, r in zip(prompts, low_bytes(prompts, completions, completion_ids),
                                                      strict=True)]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_zero_std_filter_normalised_over_kept_rows_or_as_trl(tmp_path, tiny_dirs, loss_type):
    """With one of two groups at zero std, zero_std_norm="batch" gives TRL's gradient (no row
    filtered: zero advantages add nothing but count in N and the token counts); "kept" scales it by
    N / N_kept = 2 (grpo, dr_grpo) or by all tokens / kept tokens (dapo, bnpo)."""
    data = [{"prompt": p, "answer": ""} for p in ("abc", "hello")]

    def gradients(**overrides):
        config = _config(tmp_path, tiny_dirs["llama"], loss_type=loss_type, **overrides)
        trainer = GRPOTrainer(reward_funcs=flat_for_abc, args=config, train_dataset=data)
        lengths = {}
        generate = trainer.generate

        def recording(prompts):
            out = generate(prompts)
            for prompt, completion in zip(prompts, out.completion_ids, strict=True):
                lengths[prompt] = lengths.get(prompt, 0) + len(completion)
            return out

        trainer.generate = recording
        return one_step_gradients(trainer), lengths

    trl, lengths = gradients(filter_zero_std=False)
    batch, _ = gradients(zero_std_norm="batch")
    kept, _ = gradients()
    assert any(g.abs().max() > 0 for g in trl)
    scale = {"grpo": 2.0, "dr_grpo": 2.0}.get(loss_type, sum(lengths.values()) / lengths["hello"])
    for a, b, c in zip(trl, batch, kept, strict=True):
        assert_close_to_scale(b, a, rel=1e-5)
        assert_close_to_scale(c, scale * a, rel=1e-5)
