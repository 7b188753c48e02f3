"""The delayed-recall task (generator, strict checker, dataset, reward, tokenizer) and a toy-scale
smoke test of the replication pipeline in benchmarks/replication/run.py, which trains through the
shipped trainers."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from thoughtfold.data import load_dataset_by_name
from thoughtfold.errors import ConfigError
from thoughtfold.recall import BOS, EOS, RecallTask, recall_reward, recall_tokenizer
from thoughtfold.rewards import load_reward

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


def test_dataset_rows_are_token_id_prompts_with_their_trace_and_task_columns():
    rows = load_dataset_by_name("recall:steps=5,n=40")
    assert len(rows) == 40 and rows == load_dataset_by_name("recall:steps=5,n=40")
    assert load_dataset_by_name("recall:steps=5,n=40", limit=3) == rows[:3]
    task = RecallTask(steps=5)
    for row in rows:
        assert task.check(row["prompt"], row["solution"]).correct
        assert (row["recall_steps"], row["recall_combine"], row["loss_mask_prefix"]) == (5, "copy", 1)
    assert len({row["solution"][0] for row in rows}) > 5  # the early values vary
    test = load_dataset_by_name("recall:steps=5,n=40", split="test")
    assert [r["solution"] for r in test] != [r["solution"] for r in rows]
    assert load_dataset_by_name("recall")[0]["recall_steps"] == 31
    for bad, words in [("recall:steps=x", "not a whole number"), ("recall:width=3", "bad option"),
                       ("recall:n=0", "n must be >= 1"), ("recall:combine=mul", "combine must be")]:
        with pytest.raises(ConfigError, match=words):
            load_dataset_by_name(bad)


def test_reward_is_the_strict_check_and_skips_other_rows():
    reward = load_reward("recall")
    task = RecallTask(steps=4)
    prompt, good = task.prompt(1, 2), task.trace(1, 2, 6)
    wrong = good[:-2] + [good[-2] + 1, EOS]
    assert reward(prompts=[prompt, prompt, "text prompt"], completions=["", "", ""],
                  completion_ids=[good, wrong, good], recall_steps=[4, 4, None],
                  recall_combine=["copy", "copy", None]) == [1.0, 0.0, None]
    with pytest.raises(ValueError, match="completion_ids"):
        recall_reward(prompts=[prompt], completions=["x"])


def test_tokenizer_ids_are_the_task_ids_and_round_trip():
    task = RecallTask(steps=6)
    tok = recall_tokenizer(task)
    trace = task.trace(3, 4, 7)
    text = tok.decode(trace)
    assert text.split() == list(task.render(trace))
    assert tok(text)["input_ids"] == trace
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (BOS, EOS, 0)
    assert len(tok) == task.vocab_size


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
    pte = next(r for r in results["rows"] if r["method"] == "pte")
    assert pte["backprop"] == "state" and pte["sft_steps"] == 3 * config["sft"]["max_steps"]
    # every job ran through the trainers, which left their metrics, checkpoints and adapters
    job = tmp_path / "out" / "jobs" / "pte-W3"
    assert [r["step"] for r in run.read_metrics(job / "sft" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert (job / "grpo" / "adapter" / "adapter.safetensors").is_file()
    # the base model is an ordinary model directory: the CLI generates from it
    out = subprocess.run([sys.executable, "-m", "thoughtfold.cli", "generate", "--model", str(tmp_path / "out" / "base"),
                          "--prompt", "^ 3 4", "--no-chat-template", "--max-new-tokens", "4", "--json"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert len(json.loads(out.stdout)["completion_ids"]) == 4


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


def test_readme_table_is_rendered_from_results(tmp_path):
    run = _load_run()
    row = {"method": "pte", "window": 3, "accuracy": 0.5, "n": 10, "train_peak_bytes": 2**21}
    results = {"task": {"D": 12}, "rows": [{**row, "method": "full", "window": None, "accuracy": 0.9}, row,
                                          {**row, "method": "lora_c", "window": 6, "accuracy": 0.1}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{run.README_BEGIN}\nold\n{run.README_END}\nafter\n")
    run.main(["--results", str(tmp_path / "results.json"), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old" not in text
    assert "| method | W = 3 (D/4) | W = 6 (D/2) | train peak (W = 3) |" in text
    assert "| full cache (reference) | 0.900 | 0.900 | 2.0 MiB |" in text
    assert "| LoRA_c |  | 0.100 | - |" in text
