"""One dataset row: an `Example` (``prompt``, ``answer`` and any other columns) and how a raw row of
any source maps to one (which field is the prompt, which the gold answer). Rows keep their other
columns, so TRL-style reward functions receive them as keyword arguments, and a conversational
prompt (TRL's list of messages) stays one, for the chat template to format."""

from __future__ import annotations

from typing import Any

from ..checks import is_token_ids
from ..errors import DataError
from ..messages import checked_conversation, is_conversation
from .answers import answer_text

SYSTEM_PROMPT = (
    "You are a helpful assistant that solves math problems. Reason step by step, then write the "
    "final answer in the form \\boxed{ANSWER}."
)

PROMPT_CANDIDATES = ("problem", "question", "prompt", "Problem", "Question", "input")
ANSWER_CANDIDATES = ("answer", "final_answer", "Answer", "target", "ground_truth", "solution")


class Example(dict):
    """One row: ``prompt`` (the problem text, or a conversation), ``answer`` (the gold string) and any
    other columns. A dict, so it goes straight into ``datasets.Dataset.from_list`` and reward
    ``**columns``."""

    where: str | None = None  # the row's file and line, for messages about it

    def __init__(self, prompt: str | list[dict] | list[int], answer: str, **columns: Any) -> None:
        super().__init__(prompt=prompt, answer=answer, **columns)

    @property
    def prompt(self) -> str | list[dict] | list[int]:
        return self["prompt"]

    @property
    def answer(self) -> str:
        return self["answer"]


def _pick(row: dict, field: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    """The field to read: ``field`` if given (must be present), else the first candidate present."""
    if field is not None:
        if field not in row:
            raise DataError(f"{where}: missing field '{field}' (fields present: {', '.join(row) or 'none'})")
        return field
    for name in candidates:
        if name in row:
            return name
    raise DataError(
        f"{where}: no {what} field (looked for {', '.join(candidates)}; fields present: "
        f"{', '.join(row) or 'none'}); pass {what}_field="
    )


def row_to_example(row: dict, prompt_field: str | None = None, answer_field: str | None = None,
                   where: str = "row") -> Example:
    """Map a raw row to an :class:`Example`: the prompt and answer fields become ``prompt`` and
    ``answer``; every other column is kept as is."""
    pf = _pick(row, prompt_field, PROMPT_CANDIDATES, "prompt", where)
    af = _pick(row, answer_field, ANSWER_CANDIDATES, "answer", where)
    raw = row[af]
    try:
        answer = answer_text(raw, af)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    columns = {k: v for k, v in row.items() if k not in (pf, af, "prompt", "answer")}
    if isinstance(raw, str) and answer != raw.strip() and "solution" not in columns:
        columns["solution"] = raw  # the worked solution the answer came from (for SFT traces)
    example = Example(prompt_value(row[pf], where), answer, **columns)
    example.where = where
    return example


def prompt_value(value: Any, where: str = "row") -> str | list[dict] | list[int]:
    """A prompt as its type says: a conversation (checked), token ids (integers >= 0, kept as ids),
    or text. Anything else (null, a number, an empty list) is a DataError naming `where`: it would
    otherwise train on its printed form."""
    if is_conversation(value):
        return checked_conversation(value, f"{where} prompt")
    if is_token_ids(value):
        return value
    if not isinstance(value, str):
        kind = "an empty list" if value == [] else f"{type(value).__name__} {value!r:.40}"
        raise DataError(f"{where}: the prompt must be text, token ids or chat messages, got {kind}")
    return value


def with_prompt_column(row: dict, prompt_field: str | None = None, where: str = "row") -> dict:
    """A training row with its prompt under "prompt" (TRL's column name), found as files are read
    (`prompt_field`, else "prompt", "problem", "question", ...); the other columns are kept."""
    name = _pick(row, prompt_field, ("prompt", *PROMPT_CANDIDATES), "prompt", where)
    return {**{k: v for k, v in row.items() if k != name}, "prompt": prompt_value(row[name], where)}
