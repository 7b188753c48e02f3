"""Every row of a dataset checked against the model before the first step of a training run or an
evaluation. A prompt that is empty, holds token ids outside the vocabulary or leaves no room for its
completion within the model's positions would otherwise fail only when a batch reaches it (and again
at every resume), named by its place in the batch; here it is named by its file and line, before
any work is done."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from .errors import DataError
from .prompts import check_prompt_ids, encode_prompt

if TYPE_CHECKING:
    from .policy import Policy

CompletionTokens = Callable[[dict, str], int]
"""(row, where) -> how many completion tokens the row needs (checking the row's own target)."""


def row_location(row: object, index: int, name: str = "dataset") -> str:
    """Where a row was read ("data.jsonl line 7"), or its index in `name` when it was built in memory."""
    return getattr(row, "where", None) or f"{name} row {index}"


def check_rows(policy: Policy, rows: Sequence[dict], chat_template: bool, system_prompt: str | None,
               completion_tokens: CompletionTokens, budget: str, name: str = "dataset") -> None:
    """A one-line DataError / PromptTooLongError naming the first row that cannot be run: a prompt
    that is not text or token ids, does not encode, is empty, holds ids outside the vocabulary, or
    with the tokens its completion needs (the setting `budget`) exceeds the model's positions. `name`
    says which rows they are where they were not read from a file."""
    for i, row in enumerate(rows):
        where = row_location(row, i, name)
        if not isinstance(row, dict) or "prompt" not in row:
            raise DataError(f"{where}: a row must be a mapping with a 'prompt' (got {type(row).__name__})")
        try:
            ids = encode_prompt(policy.tokenizer, row["prompt"], chat_template, system_prompt)
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        check_prompt_ids(ids, policy.model, f"{where}: the prompt", completion_tokens(row, where), budget)
