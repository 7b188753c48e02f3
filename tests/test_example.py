"""Dataset rows: the chat messages of an example."""

from __future__ import annotations

from thoughtfold.tasks.example import SYSTEM_PROMPT, Example, build_messages


def test_build_messages():
    example = Example("What is 2 + 2?", "4")
    messages = build_messages(example)
    assert messages == [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "What is 2 + 2?"}]
    assert "\\boxed{" in SYSTEM_PROMPT and "step by step" in SYSTEM_PROMPT
    assert build_messages("hi", system_prompt=None) == [{"role": "user", "content": "hi"}]
