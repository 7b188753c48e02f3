"""Rewards: math-verify equivalence table, gold/extraction edge cases, format reward, and lookup by
name. Real math-verify throughout (graded in worker processes; the pool itself: test_grading.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from thoughtfold.errors import ConfigError
from thoughtfold.tasks.answers import extract_answer
from thoughtfold.tasks.arith import arith_reward
from thoughtfold.tasks.grading import grade_answer
from thoughtfold.tasks.rewards import (
    format_reward,
    load_reward,
    make_math_reward,
    math_reward,
    reward_columns,
)

TIMEOUT_S = 1.5


@pytest.fixture(scope="module")
def reward():
    fn = make_math_reward(timeout_s=TIMEOUT_S, num_workers=2)
    fn(None, ["\\boxed{1/2}"], answer=["0.5"])  # start the workers outside any timing
    yield fn
    fn.grader.close()


EQUIVALENT = [
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\dfrac12}", "1/2"),
    ("\\boxed{1/2}", "$\\frac{1}{2}$"),
    ("\\boxed{3.0}", "3"),
    ("\\boxed{3}", "3.0"),
    ("\\boxed{x=5}", "5"),
    ("\\boxed{1,000}", "1000"),
    ("\\boxed{2\\sqrt{2}}", "\\sqrt{8}"),
    ("\\boxed{\\{1,2\\}}", "\\{2,1\\}"),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed{10^\\circ}", "10"),
    ("\\boxed{5 \\text{ cm}}", "5"),
    ("\\boxed{\\$18}", "18"),
]

WRONG = [
    ("\\boxed{6}", "7"),
    ("\\boxed{-5}", "5"),
    ("\\boxed{\\frac{1}{3}}", "0.5"),
    ("\\boxed{\\{1,3\\}}", "\\{1,2\\}"),
    ("\\boxed{2\\sqrt{3}}", "\\sqrt{8}"),
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
]


def test_equivalent_forms_accepted(reward):
    completions = [f"Some reasoning. So the answer is {p}." for p, _ in EQUIVALENT]
    scores = reward(None, completions, answer=[g for _, g in EQUIVALENT])
    assert scores == [1.0] * len(EQUIVALENT), list(zip(EQUIVALENT, scores, strict=True))


def test_wrong_answers_rejected(reward):
    scores = reward(None, [p for p, _ in WRONG], answer=[g for _, g in WRONG])
    assert scores == [0.0] * len(WRONG), list(zip(WRONG, scores, strict=True))


def test_unparseable_gold_is_none(reward):
    scores = reward(None, ["\\boxed{5}"] * 4, answer=["???", "\\frac{", "", None])
    assert scores == [None, None, None, None]
    assert grade_answer("\\boxed{5}", "}{") is None


def test_last_box_counts_and_nested_braces(reward):
    completion = "First \\boxed{3}, then I fix it: \\boxed{\\frac{1}{\\sqrt{4}}}"
    assert reward(None, [completion, completion], answer=["1/2", "3"]) == [1.0, 0.0]


def test_fallback_without_box(reward):
    completions = [
        "3 + 4 = 7, then 7 * 2 = 14. The answer is 14.",
        "Final answer: $\\frac{3}{4}$",
        "#### 1,234",
        "We have 12 apples and eat 5, leaving 7",
        "The answer is 15.",
    ]
    scores = reward(None, completions, answer=["14", "0.75", "1234", "7", "14"])
    assert scores == [1.0, 1.0, 1.0, 1.0, 0.0]


def test_think_handling(reward):
    completions = [
        "<think>maybe \\boxed{3}? no.</think> The result is \\boxed{4}.",
        "<think>I think it is \\boxed{4}</think> so \\boxed{3}",
        "<think>still thinking about \\boxed{4} and",  # never closed: no final answer
        "</think>\\boxed{4}",  # template opened <think> in the prompt
    ]
    assert reward(None, completions, answer=["4"] * 4) == [1.0, 0.0, 0.0, 1.0]
    assert extract_answer(completions[2]) is None


def test_conversational_completions(reward):
    completions = [[{"role": "assistant", "content": "\\boxed{2}"}], [{"role": "assistant", "content": "1"}]]
    assert reward(["p", "p"], completions, answer=["2", "2"]) == [1.0, 0.0]


def test_extra_columns_ignored_and_length_checked(reward):
    assert reward(["q"], ["\\boxed{2}"], answer=["2"], level=["5"], trainer_state=None) == [1.0]
    with pytest.raises(ConfigError, match="1 completions but 2 answers"):
        reward(None, ["\\boxed{2}"], answer=["2", "3"])
    with pytest.raises(ConfigError, match="needs an 'answer' or 'solution' column"):
        reward(None, ["\\boxed{2}"])


def test_trl_solution_column_is_the_gold_when_there_is_no_answer(reward):
    """TRL's accuracy reward reads `solution`: its last box (or the text itself) is the gold here too."""
    assert reward(None, ["\\boxed{2}", "\\boxed{3}"], solution=["so it is \\boxed{2}", "3"]) == [1.0, 1.0]
    assert reward(None, ["\\boxed{2}"], answer=["5"], solution=["2"]) == [0.0]  # answer first
    assert reward_columns(reward) == [("answer", "solution")]
    assert reward_columns(lambda completions, solution, **kw: []) == [("solution",)]


def test_default_math_reward_integers_fast_path():
    # plain integers are compared exactly in-process (no sympy): same verdicts as math-verify
    assert math_reward(None, ["\\boxed{1,000}", "\\boxed{999}", "nothing here"], answer=["1000"] * 3) == [
        1.0, 0.0, 0.0]


def test_integers_of_any_length_are_compared_exactly():
    """Python's int() refuses over 4,300 digits; a boxed 5,000-digit integer is still graded."""
    huge = "9" * 5000
    completions = [f"\\boxed{{{huge}}}", f"\\boxed{{0{huge}}}", f"\\boxed{{{huge[:-1]}8}}", "\\boxed{3}"]
    assert math_reward(None, completions, answer=[huge, huge, huge, "3"]) == [1.0, 1.0, 0.0, 1.0]
    assert math_reward(None, ["\\boxed{-0}", "\\boxed{-7}"], answer=["0", "7"]) == [1.0, 0.0]
    # the arith reward (small procedural numbers) skips such a gold and scores such a prediction 0
    assert arith_reward(None, completions, answer=[huge, "3", "3", "3"]) == [None, 0.0, 0.0, 1.0]


def test_format_reward_is_linear_time_on_nested_boxes():
    """Rewards parse model output: nested or unclosed boxes by the ten thousand must stay cheap."""
    start = time.monotonic()
    assert format_reward(None, ["\\boxed{" * 20000, "\\boxed{" * 20000 + "}" * 20000]) == [0.0, 0.0]
    assert time.monotonic() - start < 2.0
    assert format_reward(None, ["{ \\boxed{x} }", "\\boxed{\\boxed{x}}"]) == [1.0, 0.0]


def test_format_reward():
    completions = [
        "reasoning... \\boxed{4}",
        "\\boxed{4} and also \\boxed{5}",
        "no box at all",
        "<think>hmm \\boxed{3}</think> answer \\boxed{4}",
        "<think>hmm \\boxed{4}",
        "\\boxed{}",
        "<think>a</think>\\boxed{\\frac{1}{2}}",
    ]
    assert format_reward(None, completions) == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]


def test_load_reward_builtin_and_dotted(tmp_path: Path):
    assert load_reward("math") is math_reward
    assert load_reward("format") is format_reward
    assert load_reward("thoughtfold.tasks.rewards:format_reward") is format_reward
    assert load_reward("thoughtfold.tasks.arith.arith_reward") is load_reward("arith")
    module = tmp_path / "my_rewards.py"
    module.write_text("def length(prompts, completions, **kw):\n    return [float(len(c)) for c in "
                      "completions]\n")
    fn = load_reward(f"{module}:length")
    assert fn(None, ["ab", "abc"]) == [2.0, 3.0]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", "unknown reward 'nope'"),
        ("no_such_pkg.mod:fn", "cannot import module 'no_such_pkg.mod'"),
        ("thoughtfold.tasks.rewards:no_such_fn", "has no attribute 'no_such_fn'"),
        ("thoughtfold.tasks.rewards:BUILTIN_REWARDS", "is not callable"),
        ("missing_file.py:fn", "file missing_file.py not found"),
        ("", "non-empty string"),
    ],
)
def test_load_reward_errors(spec: str, message: str):
    with pytest.raises(ConfigError, match=message):
        load_reward(spec)


def test_a_failing_or_slow_reward_is_one_reward_error_naming_it(tmp_path):
    from thoughtfold.errors import RewardError
    from thoughtfold.tasks.rewards import keep_traceback, score_completions

    def exits(prompts, completions, **columns):
        raise SystemExit(0)

    def sleeps(prompts, completions, **columns):
        time.sleep(3600)

    def swallows(prompts, completions, **columns):
        try:
            time.sleep(3600)
        except Exception:  # a reward's own broad except does not hide its time limit
            return [1.0]

    with pytest.raises(RewardError, match="reward exits raised SystemExit: 0") as caught:
        score_completions("exits", exits, ["p"], ["c"], None, [{"prompt": "p"}])
    logged = keep_traceback(caught.value, tmp_path)
    assert str(logged).endswith(f"(traceback in {tmp_path / 'errors.log'})")
    assert "raise SystemExit(0)" in (tmp_path / "errors.log").read_text()
    for fn in (sleeps, swallows):
        start = time.monotonic()
        with pytest.raises(RewardError, match=f"reward {fn.__name__} did not return within 0.5 s"):
            score_completions(fn.__name__, fn, ["p"], ["c"], None, [{"prompt": "p"}], timeout=0.5)
        assert time.monotonic() - start < 60


@pytest.mark.parametrize("scores, result", [
    ([float("nan"), 1.0], [None, 1.0]),
    ([float("inf"), 1.0], "returned inf"),
    ([-1e39, 1.0], r"returned -1e\+39: scores must be finite"),
    ([True, 1.0], [1.0, 1.0]),
])
def test_scores_nan_is_skipped_and_infinity_refused(scores, result):
    from thoughtfold.errors import RewardError
    from thoughtfold.tasks.rewards import checked_scores

    if isinstance(result, str):
        with pytest.raises(RewardError, match=result):
            checked_scores("r", scores, 2)
    else:
        assert checked_scores("r", scores, 2) == result
