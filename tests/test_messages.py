"""TRL's conversational form: recognising and checking a conversation, the text a table or a grader
sees of it, completions handed to rewards as messages, and SFT's messages rows split into a prompt
and the turn to learn."""

from __future__ import annotations

import pytest

from thoughtfold.errors import DataError
from thoughtfold.messages import (
    assistant_turn,
    checked_conversation,
    is_conversation,
    split_messages,
    text_of,
    with_system_prompt,
)

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"}]


def test_a_conversation_is_a_list_of_messages():
    assert is_conversation(CHAT) and not is_conversation("hi") and not is_conversation([1, 2])
    assert not is_conversation([])
    assert checked_conversation(CHAT) == CHAT
    with pytest.raises(DataError, match=r"row 2 prompt: message 1 must be an object with a string \"role\""):
        checked_conversation([CHAT[0], {"role": "user", "content": None}], "row 2 prompt")


def test_system_prompt_goes_first_unless_there_is_one():
    user = CHAT[1:]
    assert with_system_prompt(user, "S") == [{"role": "system", "content": "S"}, *user]
    assert with_system_prompt(CHAT, "S") == CHAT and with_system_prompt(user, None) == user


def test_text_of_prompts_and_completions():
    assert text_of(CHAT) == "What is 2 + 3?"  # the last user turn
    assert text_of(assistant_turn("5")) == "5" and text_of("plain") == "plain"


def test_sft_messages_split_into_prompt_and_the_final_assistant_turn():
    prompt, target = split_messages([*CHAT, {"role": "assistant", "content": "5"}])
    assert (prompt, target) == (CHAT, "5")
    with pytest.raises(DataError, match="must end with an assistant turn"):
        split_messages(CHAT, "row 0")
