"""Prompts as token ids: text through the tokenizer's chat template (or plain), TRL's
conversations (lists of messages), token-id prompts passed through; and the checks of a prompt
against the model (inside its vocabulary, room for the new tokens within its positions), so bad
prompts fail in one line before any decoding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from .checks import check_utf8, is_token_ids
from .errors import DataError, PromptTooLongError
from .messages import checked_conversation, is_conversation, with_system_prompt
from .models import max_positions

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase


def has_chat_template(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer carries a chat template."""
    return bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    prompt: str | list[int] | list[dict],
    chat_template: bool = True,
    system_prompt: str | None = None,
) -> list[int]:
    """Token ids of one prompt. Token-id lists pass through unchanged. A conversation (TRL's list of
    {"role", "content"} messages) goes through the tokenizer's chat template, `system_prompt` first
    unless it has a system message; a final assistant message is continued rather than answered. A
    string becomes a user message under the chat template when the tokenizer has one and
    `chat_template` is True; otherwise it is encoded plainly (special tokens per the tokenizer's
    defaults), with `system_prompt` prepended as text if given."""
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    if is_conversation(prompt):
        if not (chat_template and has_chat_template(tokenizer)):
            raise DataError("a conversational prompt (a list of messages) needs the tokenizer's chat template"
                            + ("" if chat_template else ": turn chat_template back on")
                            + ("" if has_chat_template(tokenizer) else ", and this tokenizer has none"))
        messages = with_system_prompt(checked_conversation(prompt), system_prompt)
        for message in messages:
            check_utf8(message["content"], f"the prompt's {message['role']} message", DataError)
        return _chat_ids(tokenizer, messages)
    if isinstance(prompt, (list, tuple)):
        if not prompt:
            raise DataError("empty prompt: a token-id prompt needs at least one token")
        if not is_token_ids(list(prompt)):
            raise DataError("a prompt list must hold token ids (integers >= 0) or messages "
                            "({\"role\", \"content\"} objects)")
        return [int(t) for t in prompt]
    if not isinstance(prompt, str):
        raise DataError(f"a prompt must be a string, a list of messages or a list of token ids, "
                        f"got {type(prompt).__name__}")
    check_utf8(prompt, "the prompt", DataError)
    if system_prompt is not None:
        check_utf8(system_prompt, "the system prompt", DataError)
    if chat_template and has_chat_template(tokenizer):
        ids = _chat_ids(tokenizer, with_system_prompt([{"role": "user", "content": prompt}], system_prompt))
    else:
        text = f"{system_prompt}\n\n{prompt}" if system_prompt else prompt
        ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise DataError("empty prompt: it encodes to no tokens")
    return ids


def _chat_ids(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> list[int]:
    """The chat template's token ids of `messages`, ready for the model's turn (or, after a final
    assistant message, for more of it)."""
    go_on = messages[-1]["role"] == "assistant"
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=not go_on,
                                        continue_final_message=go_on, tokenize=True, return_dict=False)
    if hasattr(out, "keys"):
        out = out["input_ids"]
    if isinstance(out, torch.Tensor):
        out = out.tolist()
    if out and isinstance(out[0], list):
        out = out[0]
    return [int(t) for t in out]


def check_prompt_ids(ids: Sequence[int], model: PreTrainedModel, what: str, new_tokens: int = 0,
                     budget: str = "max_new_tokens") -> None:
    """A one-line error naming `what` (e.g. "prompt 3", "data.jsonl line 7: the prompt") unless the
    token ids are non-empty, inside the model's vocabulary, and leave room for `new_tokens` more
    positions (the setting `budget`) within the model's maximum positions."""
    if not ids:
        raise DataError(f"{what} is empty: give at least one token")
    vocab = model.get_input_embeddings().num_embeddings
    if max(ids) >= vocab:
        raise DataError(f"{what} has token id {max(ids)}, but the model's vocabulary has ids 0 to "
                        f"{vocab - 1}: use token ids of this model's tokenizer")
    limit = max_positions(model)
    if limit is None or len(ids) + max(new_tokens, 1) <= limit:
        return
    if len(ids) >= limit:
        raise PromptTooLongError(f"{what} has {len(ids)} tokens but the model handles at most {limit} "
                                 "positions; shorten it")
    raise PromptTooLongError(
        f"{what} of {len(ids)} tokens + {budget} {new_tokens} = {len(ids) + new_tokens} positions, but "
        f"the model handles at most {limit}: lower {budget} to {limit - len(ids)} or shorten the prompt")
