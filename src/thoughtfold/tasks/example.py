"""One dataset row: an `Example` (``prompt``, ``answer`` and any other columns) and how a raw row of
any source maps to one (which field is the prompt, which the gold answer). Rows keep their other
columns, so TRL-style reward functions receive them as keyword arguments."""

from __future__ import annotations

from typing import Any

from ..checks import is_token_ids
from ..errors import DataError
from .answers import last_boxed

SYSTEM_PROMPT = (
    "You are a helpful assistant that solves math problems. Reason step by step, then write the "
    "final answer in the form \\boxed{ANSWER}."
)

PROMPT_CANDIDATES = ("problem", "question", "prompt", "Problem", "Question", "input")
ANSWER_CANDIDATES = ("answer", "final_answer", "Answer", "target", "ground_truth", "solution")


class Example(dict):
    """One row: ``prompt`` (the problem text), ``answer`` (the gold string) and any other columns.
    A dict, so it goes straight into ``datasets.Dataset.from_list`` and reward ``**columns``."""

    where: str | None = None  # the row's file and line, for messages about it

    def __init__(self, prompt: str | list[int], answer: str, **columns: Any) -> None:
        super().__init__(prompt=prompt, answer=answer, **columns)

    @property
    def prompt(self) -> str | list[int]:
        return self["prompt"]

    @property
    def answer(self) -> str:
        return self["answer"]


def prompt_text(value: Any, where: str = "row") -> str | list[int]:
    """A prompt value as its type says: a string, token ids (a list of integers >= 0, kept as ids),
    or a chat (list of messages) whose last user turn is taken. Anything else (null, a number, an
    empty list) is a DataError naming `where`: it would otherwise train on its printed form."""
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        users = [m for m in value if m.get("role", "user") == "user"] or value
        return prompt_text(users[-1]["content"], where)
    if is_token_ids(value):
        return value
    if not isinstance(value, str):
        kind = "an empty list" if value == [] else f"{type(value).__name__} {value!r:.40}"
        raise DataError(f"{where}: the prompt must be text, token ids or chat messages, got {kind}")
    return value


def _answer_text(value: Any, field: str) -> str:
    """A gold value as a string: lists joined, numbers as text, the number after GSM8K's '####',
    or the last box of a worked solution."""
    if value is None:
        raise DataError(f"'{field}' is null: give the gold answer, or drop the row")
    if isinstance(value, list):
        return ", ".join(_answer_text(v, field) for v in value)
    text = str(value).strip()
    if "####" in text:
        return text.rpartition("####")[2].strip().replace(",", "")
    if field == "solution" or (len(text) > 40 and "\\boxed" in text):
        return (last_boxed(text) or text).strip()
    return text


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
        answer = _answer_text(raw, af)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    columns = {k: v for k, v in row.items() if k not in (pf, af, "prompt", "answer")}
    if isinstance(raw, str) and answer != raw.strip() and "solution" not in columns:
        columns["solution"] = raw  # the worked solution the answer came from (for SFT traces)
    example = Example(prompt_text(row[pf], where), answer, **columns)
    example.where = where
    return example
