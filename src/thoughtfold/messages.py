"""TRL's conversational form: a prompt (or a completion) as a list of ``{"role", "content"}``
messages. Recognising and checking one, the text a table or a reward sees of it, and the two ways
TRL builds them: completions handed to rewards as ``[{"role": "assistant", "content": text}]`` when
the prompts were conversational, and SFT's ``messages`` rows split into a prompt and the final
assistant turn to learn. Plain data: no torch, no transformers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .errors import DataError

Message = dict[str, str]


def is_conversation(value: Any) -> bool:
    """Whether `value` is a conversation: a non-empty list of dicts (messages)."""
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(m, dict) for m in value)


def checked_conversation(value: Sequence[Any], where: str = "prompt") -> list[Message]:
    """`value` as a list of messages, each with a string "role" and "content"; anything else is a
    one-line DataError naming `where` and the message."""
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with a string \"role\" and \"content\" "
                            f"(TRL's conversational form), got {str(message)[:80]}")
        messages.append({"role": message["role"], "content": message["content"]})
    if not messages:
        raise DataError(f"{where}: the conversation has no messages")
    return messages


def with_system_prompt(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """`messages` with `system_prompt` as the first message, unless there is none or they have one."""
    if not system_prompt or any(m["role"] == "system" for m in messages):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def text_of(value: Any) -> str:
    """What a prompt or completion says, for a table or a grader: a string as it is, a message's
    content, a conversation's last user turn (else its last message), anything else as text."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        return str(value.get("content", ""))
    if is_conversation(value):
        users = [m for m in value if m.get("role", "user") == "user"] or list(value)
        return text_of(users[-1])
    return "" if value is None else str(value)


def assistant_turn(text: str) -> list[Message]:
    """A completion in TRL's conversational form: what rewards receive when prompts were messages."""
    return [{"role": "assistant", "content": text}]


def split_messages(messages: Sequence[Any], where: str = "row") -> tuple[list[Message], str]:
    """SFT's ``messages`` row as (prompt messages, the final assistant turn's text): what the model
    learns to say after the conversation so far."""
    checked = checked_conversation(messages, f"{where} messages")
    if checked[-1]["role"] != "assistant" or len(checked) < 2:
        raise DataError(f"{where}: messages must end with an assistant turn after at least one other "
                        "message (the turn to learn)")
    return checked[:-1], checked[-1]["content"]
