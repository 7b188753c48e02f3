"""Reading the final answer out of a completion: the last complete box (nested braces, truncated
boxes), found in linear time however the boxes nest."""

from __future__ import annotations

import time

from thoughtfold.tasks.answers import extract_answer, last_boxed


def test_last_box_counts_and_nested_braces():
    text = "First \\boxed{3}, then I fix it: \\boxed{\\frac{1}{\\sqrt{4}}}"
    assert last_boxed(text) == "\\frac{1}{\\sqrt{4}}"


def test_truncated_box_is_not_an_answer():
    assert last_boxed("so \\boxed{\\frac{1}{2}") is None
    assert last_boxed("\\boxed{4} then \\boxed{\\frac{1") == "4"


def test_boxes_are_found_in_linear_time():
    """Model output with nested or unclosed boxes by the ten thousand must stay cheap to read."""
    start = time.monotonic()
    assert last_boxed("\\boxed{" * 20000 + "7" + "}" * 20000) == "7"
    assert extract_answer("\\boxed{" * 20000) is not None
    assert time.monotonic() - start < 2.0
    assert last_boxed("\\boxed{a} } {\\boxed{b}} \\fbox {c}") == "c"
