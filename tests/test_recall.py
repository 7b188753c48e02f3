"""The delayed-recall task (generator + strict checker) and a toy-scale smoke test of the
replication pipeline in benchmarks/replication/run.py."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from conftest import assert_close_to_scale
from thoughtfold.recall import BOS, EOS, RecallTask

ROOT = Path(__file__).resolve().parents[1]


def test_layout_and_distance():
    task = RecallTask(steps=31)
    assert task.distance == 64
    trace = task.trace(3, 4, 7)
    assert len(trace) == task.completion_length == 66
    assert trace[-1] == EOS
    assert task.render(task.prompt(3, 4) + trace).startswith("^34hA7B1C8")
    # the answer sits D tokens after the early value
    assert task.render(trace)[task.distance] == "7"
    add = RecallTask(steps=31, combine="add").trace(3, 4, 7)
    assert add[:-2] == trace[:-2] and RecallTask(31, "add").render(add)[64] == str((7 + task.chain(3, 4)[-1]) % 10)
    assert max(trace) < task.vocab_size
    with pytest.raises(ValueError):
        RecallTask(steps=3, combine="mul")


def test_generator_is_deterministic():
    task = RecallTask(steps=7)
    assert task.sample_traces(20, seed=5) == task.sample_traces(20, seed=5)
    assert task.sample_traces(20, seed=5) != task.sample_traces(20, seed=6)
    assert task.sample_prompts(20, seed=5) == task.sample_prompts(20, seed=5)
    _, traces = task.sample_traces(500, seed=0)
    assert {t[0] for t in traces} == set(range(14, 24))  # every early value occurs


@pytest.mark.parametrize("combine", ["copy", "add"])
def test_early_value_is_not_derivable_from_the_prompt(combine):
    """For a fixed prompt each of the 10 values gives a valid trace with a different answer, so any
    answer that ignores the trace's own value is right for at most one value in ten."""
    task = RecallTask(steps=9, combine=combine)
    for a, b in [(0, 0), (3, 4), (9, 1)]:
        prompt = task.prompt(a, b)
        assert prompt == [BOS, 4 + a, 4 + b]  # the value is no input of the prompt
        traces = [task.trace(a, b, v) for v in range(10)]
        assert all(task.check(prompt, t).correct for t in traces)
        answers = [t[-2] for t in traces]
        assert len(set(answers)) == 10
        # all traces agree outside the value and the answer: nothing else carries the value
        assert len({tuple(t[1:-3]) for t in traces}) == 1
        # an answer tuned to one value fails for the nine others
        for v, t in enumerate(traces):
            wrong = [sum(task.check(prompt, t[:-2] + [u, EOS]).correct for u in answers)]
            assert wrong == [1], v
    assert task.chance == pytest.approx(0.1)


def test_checker_rejects_wrong_traces():
    task = RecallTask(steps=6)
    prompt, good = task.prompt(2, 5), task.trace(2, 5, 4)
    assert task.check(prompt, good).correct
    c = task.check(prompt, good[:-2] + [4 + (good[-2] - 4 + 1) % 10, EOS])
    assert not c.correct and c.chain_ok and c.value == 4 and c.expected == 4
    bad_chain = list(good)
    bad_chain[2] = 4 + (bad_chain[2] - 4 + 1) % 10
    assert not task.check(prompt, bad_chain).chain_ok and not task.check(prompt, bad_chain).correct
    assert not task.check(prompt, good[:-1]).correct  # no EOS
    assert not task.check(prompt, good + [EOS]).correct  # trailing token
    assert not task.check(prompt, [good[2]] + good[1:]).correct  # no value symbol first
    assert not task.check(prompt, []).correct
    assert task.reward(prompts=[prompt, prompt], completion_ids=[good, good[:-1]]) == [1.0, 0.0]
    with pytest.raises(ValueError):
        task.check([BOS, 4], good)


def _load_run():
    """benchmarks/replication/run.py as the module `run`, importable by name, as its worker processes
    (spawned with this process's sys.path) need to unpickle their job function."""
    folder = str(ROOT / "benchmarks/replication")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("run")


def test_pipeline_smoke(tmp_path):
    run = _load_run()
    config = run.merge(run.DEFAULT_CONFIG, run.QUICK_CONFIG)
    config.update(windows=[3], methods=["lora_c", "pte"], ablations=["pte_fb_global0"])
    results_path = tmp_path / "results.json"
    run.run(config, tmp_path / "out", results_path, tmp_path / "RESULTS.md")
    results = json.loads(results_path.read_text())
    assert results["task"]["D"] == 12 and results["task"]["chance"] == pytest.approx(0.1)
    methods = [(r["method"], r["window"]) for r in results["rows"]]
    assert methods == [("full", None), ("bounded", 3), ("lora_c", 3), ("pte", 3), ("pte_fb_global0", 3)]
    for r in results["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == config["eval"]["n"]
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        assert r["rollout_peak_bytes"] > 0
    assert all(r["train_peak_bytes"] > 0 for r in results["rows"] if r["method"] != "bounded")
    assert "| pte | 3 |" in (tmp_path / "RESULTS.md").read_text()


def test_pipeline_parallel_workers(tmp_path):
    """The default path: training jobs in worker processes, rows in job order, longer-SFT rows named."""
    run = _load_run()
    config = run.merge(run.DEFAULT_CONFIG, run.QUICK_CONFIG)
    config.update(windows=[3], methods=["lora_c"], ablations=["pte_truncated"], workers=2,
                  sft_multiplier={"lora_c": 2})
    results = run.run(config, tmp_path / "out", tmp_path / "results.json", tmp_path / "RESULTS.md")
    rows = [(r["method"], r["window"], r.get("sft_steps")) for r in results["rows"]]
    steps = config["sft"]["steps"]
    assert rows == [("full", None, None), ("bounded", 3, None), ("lora_c", 3, 2 * steps), ("pte_truncated", 3, steps)]
    assert "lora_c W=3 starts" in (tmp_path / "out" / "log.txt").read_text()


def test_state_bptt_matches_full_graph_with_detached_kv(monkeypatch):
    """Replay with state_backprop (segment-wise replay + a second pass through the state chain) gives
    the gradients of one full graph in which only the cached K/V are detached."""
    import copy

    import torch

    import thoughtfold.replay as replay_mod
    from thoughtfold.config import AdapterConfig, CacheConfig
    from thoughtfold.policy import Policy

    run = _load_run()
    task = RecallTask(steps=6)
    model = run.build_model(task, run.QUICK_CONFIG["model"], seed=0)
    prompts, traces = task.sample_traces(3, seed=0)
    grads = {}
    for mode in ("state", "reference"):
        torch.manual_seed(0)
        policy = Policy(copy.deepcopy(model), None, cache=CacheConfig(window=4),
                        adapter=AdapterConfig(mode="pte", rank=4, alpha=8.0, global_tokens=2))
        with torch.no_grad():  # a non-zero adapter, so that the states matter
            for w in policy.wrappers:
                w.lora_up.normal_(0, 0.1)
        loss_fn = run.sft_loss_fn(sum(map(len, traces)))
        if mode == "state":
            run.replay(policy, prompts, traces, None, loss_fn, backprop="state")
        else:
            def append_detached(self, cache, tokens, valid, detach, append=replay_mod._Context.append):
                return append(self, cache, tokens, valid, True)

            monkeypatch.setattr(replay_mod._Context, "append", append_detached)
            run.replay(policy, prompts, traces, None, loss_fn, backprop=True)
            monkeypatch.undo()
        grads[mode] = [p.grad.clone() for p in policy.trainable_parameters()]
    assert grads["state"][-1].abs().sum() > 0  # the encoder gets gradients
    for a, b in zip(grads["state"], grads["reference"], strict=True):
        assert_close_to_scale(a, b, rel=1e-5)


def test_merge_rows_keeps_prose(tmp_path):
    run = _load_run()
    task = {"name": "delayed_recall", "D": 12, "chance": 0.1}
    row = {"method": "pte", "window": 3, "accuracy": 0.5, "n": 10, "ci95": [0.2, 0.8], "chain_accuracy": 1.0,
           "value_entropy_bits": 3.3, "rollout_peak_bytes": 1, "train_peak_bytes": 2}
    main = {"task": task, "model": {"parameters": 1000}, "config": {"memory_probe": 2}, "rows": [row]}
    other = {**main, "rows": [row, {**row, "method": "pte_state_bptt", "accuracy": 0.9}]}
    (tmp_path / "results.json").write_text(json.dumps(main))
    (tmp_path / "other.json").write_text(json.dumps(other))
    (tmp_path / "RESULTS.md").write_text(f"intro\n{run.BEGIN}\nold\n{run.END}\nnotes\n")
    run.main(["--results", str(tmp_path / "results.json"), "--merge", str(tmp_path / "other.json")])
    merged = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in merged["rows"]] == ["pte", "pte_state_bptt"]
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("intro\n") and text.endswith("notes\n") and "old" not in text
    assert "| pte_state_bptt | 3 | 0.900 |" in text
