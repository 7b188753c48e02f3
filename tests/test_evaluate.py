"""Evaluation: the pass@k estimator, math-verify grading of a fixture set, end-to-end eval of a tiny
model under two windows, resume after an interrupted run, and the `thoughtfold eval` command."""

from __future__ import annotations

import json
import shutil
from math import comb
from pathlib import Path

import pytest

from thoughtfold.cli import main
from thoughtfold.config import SamplingConfig
from thoughtfold.errors import ConfigError
from thoughtfold.evaluation.evaluate import (
    SAMPLES_NAME,
    SUMMARY_NAME,
    EvalConfig,
    Grader,
    evaluate,
    ks_for,
    pass_at_k,
    read_samples,
    summary_table,
)

FIXTURES = Path(__file__).parent / "fixtures"
PROBLEMS = FIXTURES / "eval_problems.jsonl"


# --------------------------------------------------------------------------- pass@k


@pytest.mark.parametrize(("n", "c", "k", "expected"), [
    (1, 0, 1, 0.0),
    (1, 1, 1, 1.0),
    (4, 1, 1, 0.25),
    (4, 2, 2, 1 - 1 / 6),      # 1 - C(2,2)/C(4,2)
    (4, 1, 2, 0.5),            # 1 - C(3,2)/C(4,2) = 1 - 3/6
    (5, 2, 3, 1 - 1 / 10),     # 1 - C(3,3)/C(5,3)
    (8, 3, 4, 1 - 5 / 70),     # 1 - C(5,4)/C(8,4)
    (8, 5, 4, 1.0),            # n - c < k: some correct sample is always drawn
    (8, 0, 8, 0.0),
    (16, 1, 16, 1.0),
])
def test_pass_at_k_hand_computed(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_pass_at_k_matches_binomial_formula_and_rejects_bad_input():
    for n in range(1, 12):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)
    assert ks_for(1) == [1]
    assert ks_for(4) == [1, 2, 4]
    assert ks_for(6) == [1, 2, 4, 6]


# --------------------------------------------------------------------------- grading


def test_math_verify_grading_of_fixture_set():
    lines = (FIXTURES / "grading.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines if line.strip()]
    grader = Grader("math")
    try:
        scores = grader([""] * len(rows), [r["completion"] for r in rows],
                        [{"answer": r["gold"]} for r in rows])
    finally:
        grader.close()
    assert [s == 1.0 for s in scores] == [r["correct"] for r in rows]


# --------------------------------------------------------------------------- end to end


class CountingPolicy:
    """Wraps a Policy and counts generate calls (and the rows they decode)."""

    def __init__(self, policy):
        self.policy, self.calls, self.rows = policy, 0, 0

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def __setattr__(self, name, value):
        if name == "cache_config":
            self.policy.cache_config = value
        else:
            object.__setattr__(self, name, value)

    def generate(self, prompts, **kwargs):
        self.calls += 1
        self.rows += len(prompts)
        return self.policy.generate(prompts, **kwargs)


@pytest.fixture(scope="module")
def tiny_policy(tiny_dirs):
    from thoughtfold.policy import Policy

    return Policy.from_pretrained(str(tiny_dirs["qwen2"]), device="cpu")


def _config(out: Path, temperature: float = 1.0, max_new_tokens: int = 12, **overrides) -> EvalConfig:
    sampling = SamplingConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=0.95, seed=0)
    kwargs = dict(datasets=[str(PROBLEMS)], windows=[4, None], n_samples=2, batch_size=4, reward="math",
                  sampling=sampling,
                  output_dir=str(out), progress=False)
    kwargs.update(overrides)
    return EvalConfig(**kwargs)


def test_eval_end_to_end_two_windows(tiny_policy, tmp_path):
    policy = CountingPolicy(tiny_policy)
    summary = evaluate(policy, _config(tmp_path / "run"), model="tiny")
    # 3 problems x 2 samples = 6 rows per window, batches of 4 -> 2 calls per window
    assert policy.calls == 4 and policy.rows == 12
    assert tiny_policy.cache_config.window is None  # restored
    records = [json.loads(line) for line in (tmp_path / "run" / SAMPLES_NAME).read_text().splitlines()]
    assert len(records) == 12
    assert {(r["window"], r["index"], r["sample"]) for r in records} == {
        (w, i, s) for w in (4, None) for i in range(3) for s in range(2)}
    for r in records:
        assert set(r) >= {"dataset", "window", "index", "sample", "prompt", "completion", "extracted", "gold",
                          "correct", "evictions", "length"}
        assert isinstance(r["correct"], bool)
        if r["window"] is None:
            assert r["evictions"] == 0
    assert any(r["evictions"] > 0 for r in records if r["window"] == 4 and r["length"] >= 8)
    assert [r["gold"] for r in records[:2]] == ["5", "5"]
    saved = json.loads((tmp_path / "run" / SUMMARY_NAME).read_text())
    assert saved == summary
    assert summary["method"] == "base"
    rows = summary["results"]
    assert [(r["dataset"], r["window"]) for r in rows] == [(str(PROBLEMS), 4), (str(PROBLEMS), None)]
    for r in rows:
        assert r["problems"] == 3 and r["n_samples"] == 2 and r["complete"]
        assert set(r["pass@k"]) == {"1", "2"}
        assert r["pass@k"]["1"] == pytest.approx(r["pass@1"])
        assert 0.0 <= r["pass@1"] <= r["pass@k"]["2"] <= 1.0
    table = summary_table(summary)
    assert "pass@1 %" in table and "pass@2 %" in table and "| full" in table


def test_eval_resume_after_interruption(tiny_policy, tmp_path):
    first = CountingPolicy(tiny_policy)
    full = evaluate(first, _config(tmp_path / "full"), model="tiny")
    lines = (tmp_path / "full" / SAMPLES_NAME).read_text().splitlines(keepends=True)
    # a run killed while writing: the first batch (4 rows) and one row of the second batch of the first
    # window are complete, the next line is cut mid-way
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copy(tmp_path / "full" / "eval_config.json", resumed_dir)
    (resumed_dir / SAMPLES_NAME).write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    second = CountingPolicy(tiny_policy)
    resumed = evaluate(second, _config(resumed_dir), model="tiny")
    # the finished batch is not regenerated: 3 of the 4 batches run again, 12 - 5 rows written
    assert second.calls == 3
    assert resumed == full
    again = read_samples(resumed_dir / SAMPLES_NAME)
    assert len((resumed_dir / SAMPLES_NAME).read_text().splitlines()) == 12
    assert again == read_samples(tmp_path / "full" / SAMPLES_NAME)
    # a finished evaluation reruns without generating anything
    third = CountingPolicy(tiny_policy)
    assert evaluate(third, _config(resumed_dir), model="tiny") == full
    assert third.calls == 0
    # other sampling settings in the same directory are refused
    with pytest.raises(ConfigError, match="temperature"):
        evaluate(CountingPolicy(tiny_policy), _config(resumed_dir, temperature=0.5), model="tiny")


def test_eval_slots_decode_a_batch_continuously_and_sample_the_same(tiny_policy, tmp_path):
    """With 2 slots for batches of 4, each batch is one generate call whose finished slots take the
    batch's next prompts: the samples are those of decoding every prompt of the batch at once."""
    every = evaluate(tiny_policy, _config(tmp_path / "every", windows=[4]), model="tiny")
    policy = CountingPolicy(tiny_policy)
    slots = evaluate(policy, _config(tmp_path / "slots", windows=[4], slots=2), model="tiny")
    assert policy.calls == 2 and slots["results"] == every["results"]
    assert read_samples(tmp_path / "slots" / SAMPLES_NAME) == read_samples(tmp_path / "every" / SAMPLES_NAME)
    with pytest.raises(ConfigError, match="slots"):
        _config(tmp_path / "bad", slots=0)


def test_eval_config_validation():
    with pytest.raises(ConfigError, match="n-samples"):
        EvalConfig(datasets=["x.jsonl"], n_samples=0)
    with pytest.raises(ConfigError, match="window"):
        EvalConfig(datasets=["x.jsonl"], windows=[0])
    with pytest.raises(ConfigError, match="dataset"):
        EvalConfig(datasets=[])


def test_eval_command(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = main(["eval", "--model", str(tiny_dirs["llama"]), "--dataset", str(PROBLEMS), "--window", "4,none",
               "--n-samples", "2", "--max-new-tokens", "8", "--limit", "2", "--batch-size", "4",
               "--reward", "arith", "--output", str(out), "--device", "cpu", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0
    assert "pass@1 %" in printed and "pass@2 %" in printed
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert [r["window"] for r in summary["results"]] == [4, None]
    assert all(r["problems"] == 2 for r in summary["results"])
    assert len((out / SAMPLES_NAME).read_text().splitlines()) == 8


def test_eval_command_errors(capsys):
    assert main(["eval", "--dataset", "x.jsonl", "--window", "4,abc"]) == 2
    assert "window must be an integer" in capsys.readouterr().err
    assert main(["eval", "--dataset", "x.jsonl", "--n-samples", "0"]) == 2
    assert "n-samples must be >= 1" in capsys.readouterr().err
    assert main(["eval", "--dataset", "x.jsonl", "--adapter", "/nonexistent/adapter"]) == 2
    assert "not found" in capsys.readouterr().err


def test_killed_eval_command_resumes(tiny_dirs, tiny_policy, tmp_path):
    """SIGKILL a running `thoughtfold eval` after its first batch, rerun the same command: it reports
    the finished samples as reused, generates only the rest, and ends with the summary an
    uninterrupted run gives."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "killed"
    args = [sys.executable, "-m", "thoughtfold.cli", "eval", "--model", str(tiny_dirs["qwen2"]), "--dataset",
            str(PROBLEMS), "--window", "4,none", "--n-samples", "4", "--batch-size", "2",
            "--temperature", "1.0", "--max-new-tokens", "48", "--reward", "arith", "--device", "cpu",
            "--output", str(out), "--no-progress"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    samples = out / SAMPLES_NAME
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if samples.is_file() and samples.read_bytes().count(b"\n") >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the evaluation finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    proc.stderr.close()
    assert not (out / SUMMARY_NAME).exists()
    before = len(read_samples(samples))
    assert 2 <= before < 24

    rerun = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{before} of 24 samples already done" in rerun.stderr
    assert f"{24 - before} samples generated now, {before} reused" in rerun.stderr
    assert len(read_samples(samples)) == 24

    uninterrupted = _config(tmp_path / "uninterrupted", n_samples=4, batch_size=2, max_new_tokens=48,
                            reward="arith")
    expected = evaluate(tiny_policy, uninterrupted, model=str(tiny_dirs["qwen2"]))
    resumed = json.loads((out / SUMMARY_NAME).read_text())
    assert resumed["results"] == expected["results"]


def test_eval_command_with_adapter_uses_its_window_and_mode(tiny_dirs, tmp_path, capsys):
    from thoughtfold.config import AdapterConfig, CacheConfig
    from thoughtfold.policy import Policy

    policy = Policy.from_pretrained(str(tiny_dirs["qwen3"]), cache=CacheConfig(window=6),
                                    adapter=AdapterConfig(mode="pte", rank=4, global_tokens=2), device="cpu")
    policy.save_adapter(str(tmp_path / "adapter"))
    out = tmp_path / "eval"
    rc = main(["eval", "--adapter", str(tmp_path / "adapter"), "--dataset", str(PROBLEMS), "--limit", "1",
               "--max-new-tokens", "10", "--reward", "arith", "--output", str(out), "--device", "cpu",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["method"] == "pte"
    assert summary["adapter"] == str((tmp_path / "adapter").resolve())
    assert [r["window"] for r in summary["results"]] == [6]
    assert summary["results"][0]["mean_evictions"] > 0
    assert "| 6 " in capsys.readouterr().out


def test_eval_refuses_samples_of_another_adapter_saved_at_the_same_path(tiny_dirs, tmp_path, capsys):
    """Finished samples are reused only for the same adapter weights, not the same path."""
    import torch

    from thoughtfold.config import AdapterConfig, CacheConfig
    from thoughtfold.policy import Policy

    policy = Policy.from_pretrained(str(tiny_dirs["qwen2"]), cache=CacheConfig(window=6),
                                    adapter=AdapterConfig(mode="lora", rank=4), device="cpu")
    adapter, out = tmp_path / "adapter", tmp_path / "eval"
    args = ["eval", "--adapter", str(adapter), "--dataset", str(PROBLEMS), "--limit", "1",
            "--max-new-tokens", "4", "--reward", "arith", "--output", str(out), "--device", "cpu",
            "--no-progress"]
    policy.save_adapter(str(adapter))
    assert main(args) == 0, capsys.readouterr().err
    policy.save_adapter(str(adapter))  # the same weights again: the finished samples are reused
    assert main(args) == 0, capsys.readouterr().err
    with torch.no_grad():
        policy.wrappers[0].lora_up.add_(1.0)
    policy.save_adapter(str(adapter))
    assert main(args) == 2
    assert "adapter_sha256" in capsys.readouterr().err


def test_eval_with_an_unknown_reward_writes_nothing(tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(["eval", "--dataset", str(PROBLEMS), "--reward", "nosuch", "--output", str(out)]) == 2
    assert "unknown reward 'nosuch'" in capsys.readouterr().err
    assert not out.exists()  # so the next eval into it, with a real reward, is not refused


def test_eval_into_an_unwritable_output_fails_before_the_model_loads(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["eval", "--model", str(tmp_path / "no-model"), "--dataset", str(PROBLEMS),
                 "--reward", "arith", "--output", str(blocker / "eval")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot write to the output directory") and err.count("\n") == 1


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_eval_temperature_must_be_a_finite_number(value):
    with pytest.raises(ConfigError, match="temperature must be a number >= 0"):
        EvalConfig(datasets=["x.jsonl"], sampling=SamplingConfig(temperature=float(value)))


def test_grader_refuses_scores_that_are_not_numbers():
    grader = Grader(lambda prompts, completions, **kw: ["1.0"] * len(completions))
    with pytest.raises(ConfigError, match=r"returned '1.0' \(str\); scores must be numbers or None"):
        grader(["p"], ["c"], [{"prompt": "p"}])


def test_eval_resumed_under_headkv_samples_what_an_uninterrupted_one_does(tiny_dirs, tmp_path):
    """The head weights come from the first batch of the first dataset whatever a resumed evaluation
    has left to do (each run here starts from a fresh Policy, as a new process would)."""
    import torch

    from thoughtfold.config import CacheConfig
    from thoughtfold.policy import Policy

    def run(out: Path) -> tuple[dict, torch.Tensor]:
        policy = Policy.from_pretrained(str(tiny_dirs["qwen2"]), device="cpu")
        config = _config(out, windows=[4], batch_size=2, max_new_tokens=16,
                         cache=CacheConfig(window=4, eviction="headkv"))
        return evaluate(policy, config, model="tiny"), policy.head_weights

    full, weights = run(tmp_path / "full")
    lines = (tmp_path / "full" / SAMPLES_NAME).read_text().splitlines(keepends=True)
    (tmp_path / "resumed").mkdir()
    shutil.copy(tmp_path / "full" / "eval_config.json", tmp_path / "resumed")
    (tmp_path / "resumed" / SAMPLES_NAME).write_text("".join(lines[:2]))  # killed after its first batch
    resumed, resumed_weights = run(tmp_path / "resumed")
    assert resumed == full and torch.equal(resumed_weights, weights)
    assert read_samples(tmp_path / "resumed" / SAMPLES_NAME) == read_samples(tmp_path / "full" / SAMPLES_NAME)
    assert any(r["evictions"] for r in read_samples(tmp_path / "full" / SAMPLES_NAME).values())


def test_eval_keeps_the_adapters_observe_window_and_a_full_cache_window_any_eviction(tiny_dirs, tmp_path,
                                                                                     capsys):
    from thoughtfold.config import AdapterConfig, CacheConfig
    from thoughtfold.policy import Policy

    cache = CacheConfig(window=8, eviction="snapkv", observe_window=3)
    policy = Policy.from_pretrained(str(tiny_dirs["qwen2"]), cache=cache,
                                    adapter=AdapterConfig(mode="lora", rank=4), device="cpu")
    policy.save_adapter(str(tmp_path / "ad"))
    common = ["--dataset", str(PROBLEMS), "--limit", "1", "--max-new-tokens", "12", "--reward", "arith",
              "--device", "cpu", "--no-progress"]
    assert main(["eval", "--adapter", str(tmp_path / "ad"), "--output", str(tmp_path / "a"), *common]) == 0
    saved = json.loads((tmp_path / "a" / "eval_config.json").read_text())
    assert (saved["eviction"], saved["observe_window"], saved["windows"]) == ("snapkv", 3, [8])
    # a list with a full-cache window: the eviction flag applies to the bounded windows
    assert main(["eval", "--model", str(tiny_dirs["qwen2"]), "--window", "6,none", "--eviction", "snapkv",
                 "--output", str(tmp_path / "b"), *common]) == 0
    summary = json.loads((tmp_path / "b" / SUMMARY_NAME).read_text())
    assert [r["window"] for r in summary["results"]] == [6, None]
    assert summary["settings"]["eviction"] == "snapkv"
    capsys.readouterr()


def test_a_failed_eval_leaves_nothing_that_refuses_its_corrected_rerun(tiny_dirs, tmp_path, capsys):
    rewards = tmp_path / "rewards.py"
    rewards.write_text("def broken(prompts, completions, **columns):\n    raise KeyError('gold')\n")
    out = tmp_path / "eval"
    args = ["eval", "--model", str(tiny_dirs["llama"]), "--dataset", str(PROBLEMS), "--limit", "2",
            "--max-new-tokens", "4", "--output", str(out), "--device", "cpu", "--no-progress", "--reward"]
    assert main([*args, f"{rewards}:broken"]) == 2
    err = capsys.readouterr().err
    assert f"error: reward {rewards}:broken raised KeyError: 'gold' (traceback in {out}/errors.log)" in err
    assert "Traceback" not in err and "raise KeyError('gold')" in (out / "errors.log").read_text()
    assert main([*args, "arith"]) == 0, capsys.readouterr().err
    assert len(read_samples(out / SAMPLES_NAME)) == 2
