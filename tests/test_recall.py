"""The delayed-recall task: generator, strict checker, dataset, reward, tokenizer."""

from __future__ import annotations

import pytest

from thoughtfold.errors import ConfigError
from thoughtfold.tasks.data import load_dataset_by_name
from thoughtfold.tasks.recall import BOS, EOS, RecallTask, recall_reward, recall_tokenizer
from thoughtfold.tasks.rewards import load_reward


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
    assert add[:-2] == trace[:-2]
    assert RecallTask(31, "add").render(add)[64] == str((7 + task.chain(3, 4)[-1]) % 10)
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
                       ("recall:n=0", "n must be an integer >= 1"),
                       ("recall:combine=mul", "combine must be")]:
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
