"""The arithmetic task: correct, deterministic problems with worked solutions, its difficulty knobs
and spec strings, and its exact-match reward (bounded on numbers a model can write but not afford)."""

from __future__ import annotations

import time

import pytest

from thoughtfold.errors import ConfigError
from thoughtfold.tasks.answers import last_boxed
from thoughtfold.tasks.arith import ARITH_PRESETS, ArithConfig, arith_dataset, arith_reward, parse_arith_spec


def _value(expression: str) -> int:
    return eval(expression, {"__builtins__": {}})  # test-only oracle: digits and + - * only


@pytest.mark.parametrize("preset", list(ARITH_PRESETS))
def test_arith_answers_are_correct_and_deterministic(preset: str):
    rows = arith_dataset(f"arith:{preset},n=100")
    config = ARITH_PRESETS[preset]
    assert len(rows) == 100
    for r in rows:
        assert r.prompt == f"What is {r['expression']}?"
        assert r.answer == str(_value(r["expression"]))
        assert int(r.answer) >= 0
        assert last_boxed(r["solution"]) == r.answer  # the worked trace (SFT target) ends in the gold
        assert len(r["expression"].split()) == 2 * config.steps + 1
    assert arith_dataset(f"arith:{preset},n=100") == rows
    assert arith_dataset(f"arith:{preset},n=100,seed=1") != rows
    assert arith_dataset(f"arith:{preset},n=100", split="test") != rows
    assert arith_dataset(f"arith:{preset},n=100", limit=10) == rows[:10]  # prefix-stable


@pytest.mark.parametrize("preset", list(ARITH_PRESETS))
def test_test_problems_are_never_training_problems(preset: str):
    """The splits partition the problems, even "tiny"'s 81: evaluation on "test" is held out."""
    train = {r["expression"] for r in arith_dataset(f"arith:{preset}")}
    test = {r["expression"] for r in arith_dataset(f"arith:{preset}", split="test")}
    assert test and not train & test
    if preset == "tiny":  # every problem drawn: about a quarter of them held out
        assert len(train | test) == 81 and 15 <= len(test) <= 30


def test_arith_knobs():
    rows = arith_dataset(ArithConfig(steps=4, digits=3, ops="+-", n=50, seed=3))
    for r in rows:
        tokens = r["expression"].split()
        assert all(len(t) == 3 for t in tokens[::2]) and set(tokens[1::2]) <= {"+", "-"}
        running = int(tokens[0])
        for op, x in zip(tokens[1::2], tokens[2::2], strict=True):
            running = running + int(x) if op == "+" else running - int(x)
            assert running >= 0  # negative=False keeps every partial result >= 0
    neg = arith_dataset("arith:steps=3,digits=2,ops=-,negative=true,n=50")
    assert any(int(r.answer) < 0 for r in neg)
    mul = arith_dataset("arith:steps=2,digits=2,ops=*,mul_digits=1,n=20")
    assert all(len(t) == 1 for r in mul for t in r["expression"].split()[2::2])


def test_parse_arith_spec():
    assert parse_arith_spec("arith") == ARITH_PRESETS["easy"]
    assert parse_arith_spec("arith:hard") == ARITH_PRESETS["hard"]
    assert parse_arith_spec("arith:easy,n=100,seed=7") == ArithConfig(steps=2, digits=1, ops="+",
                                                                      n=100, seed=7)
    assert parse_arith_spec("arith:steps=3,digits=2,n=200,seed=0") == ArithConfig(steps=3, digits=2, n=200)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("arith:colour=3", "unknown option 'colour'"),
        ("arith:insane", "unknown preset 'insane'"),
        ("arith:steps=two", "steps='two' is not a valid int"),
        ("arith:negative=maybe", "negative='maybe' is not a valid bool"),
        ("arith:steps=0", "steps must be an integer >= 1"),
        ("arith:ops=/", "ops must be"),
    ],
)
def test_parse_arith_spec_errors(spec: str, message: str):
    with pytest.raises(ConfigError, match=message):
        parse_arith_spec(spec)


def test_arith_reward_is_bounded_on_huge_exponents():
    """Fraction("1e100000000") computes 10**1e8: such numbers are not numbers to the arith reward."""
    start = time.monotonic()
    scores = arith_reward(None, ["\\boxed{1e100000000}", "\\boxed{1e-99999999}", "\\boxed{2.5e3}"],
                          answer=["1e100000000", "3", "2500"])
    assert scores == [None, 0.0, 1.0]
    assert time.monotonic() - start < 1.0


def test_arith_reward():
    completions = ["= \\boxed{42}", "so 41", "The total is 1,234 apples.", "\\boxed{7}", "<think>42"]
    golds = ["42", "42", "1234", "x", "42"]
    assert arith_reward(None, completions, answer=golds) == [1.0, 0.0, 1.0, None, 0.0]
