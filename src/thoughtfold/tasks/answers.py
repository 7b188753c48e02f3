"""Reading the final answer out of a completion's text: boxed answers, answer markers, the last
number, and the gold answers a reward compares with. Plain string work on untrusted model output
(linear time), shared by the rewards and the datasets (which take a worked solution's gold answer
from its last box)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from ..errors import ConfigError, DataError

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BRACE_RE = re.compile(r"[{}]")
_BOXED_NOBRACE_RE = re.compile(r"\\boxed +([^\s$]+)")
_ANSWER_MARKER_RE = re.compile(r"(?:final answer|answer is|answer\s*:|####)\s*:?\s*", re.IGNORECASE)
_NUMBER_RE = re.compile(r"[+-]?\d[\d,]*(?:\.\d+)?")


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or TRL's conversational form (list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, Sequence) and completion:
        return completion_text(completion[-1])
    return "" if completion is None else str(completion)


def final_section(text: str) -> str | None:
    """The part after the last ``</think>``; None when a ``<think>`` was opened and never closed
    (the model was still thinking, so it gave no final answer)."""
    if "</think>" in text:
        return text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        return None
    return text


def boxed_spans(text: str) -> list[tuple[int, int]]:
    """(start, end) of the contents of every complete ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces
    matched), in order of their start. A truncated box with unbalanced braces is not returned.
    One pass over the braces, and spans rather than strings: rewards run on untrusted model output,
    where ``"\\boxed{" * 20000`` must not cost quadratic time or memory."""
    box_starts = {m.end() for m in _BOXED_RE.finditer(text)}  # just after each box's "{"
    spans: list[tuple[int, int]] = []
    open_braces: list[int | None] = []  # per open "{": its box's content start, None if not a box
    for brace in _BRACE_RE.finditer(text):
        i = brace.start()
        if text[i] == "{":
            open_braces.append(i + 1 if i + 1 in box_starts else None)
        elif open_braces:
            start = open_braces.pop()
            if start is not None:
                spans.append((start, i))
    if not spans:  # "\boxed 5" (no braces) is rare but valid LaTeX
        spans = [m.span(1) for m in _BOXED_NOBRACE_RE.finditer(text)]
    return sorted(spans)


def last_boxed(text: str) -> str | None:
    """The content of the last complete ``\\boxed{}`` in ``text``, or None."""
    spans = boxed_spans(text)
    return text[slice(*spans[-1])] if spans else None


def extract_answer(completion: Any) -> str | None:
    """The final answer as a string for math-verify: ``\\boxed{<last box>}`` if there is one, else the
    text after the last "answer is / Answer: / ####" marker, else the tail of the completion (where
    math-verify takes the last number or expression). None when there is no final section."""
    text = final_section(completion_text(completion))
    if text is None or not text.strip():
        return None
    boxed = last_boxed(text)
    if boxed is not None:
        return "\\boxed{" + boxed + "}" if boxed.strip() else None
    markers = list(_ANSWER_MARKER_RE.finditer(text))
    if markers:
        tail = text[markers[-1].end():].strip().split("\n", 1)[0][:200]
        if tail:
            return tail
    return text[-300:]


def last_number(text: str) -> str | None:
    """The last number in ``text`` (commas as thousands separators allowed), or None."""
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1].rstrip(",") if numbers else None


def answer_text(value: Any, field: str) -> str:
    """A gold value as a string: lists joined, numbers as text, the number after GSM8K's '####',
    or the last box of a worked solution. A null is a DataError: it would become the gold "None"."""
    if value is None:
        raise DataError(f"'{field}' is null: give the gold answer, or drop the row")
    if isinstance(value, list):
        return ", ".join(answer_text(v, field) for v in value)
    text = str(value).strip()
    if "####" in text:
        return text.rpartition("####")[2].strip().replace(",", "")
    if field == "solution" or (len(text) > 40 and "\\boxed" in text):
        return (last_boxed(text) or text).strip()
    return text


def gold_answers(answer: Sequence[Any] | None, n: int, reward: str,
                 solution: Sequence[Any] | None = None) -> list[str | None]:
    """The gold answers of the dataset's ``answer`` column as strings, None where a row has none;
    without that column TRL's ``solution`` column (its last \\boxed{}, else its text). A missing
    column or a count that does not match the `n` completions is a ConfigError naming the
    `reward` function."""
    if answer is None and solution is not None:
        answer = [None if s is None else answer_text(s, "solution") for s in solution]
    if answer is None:
        raise ConfigError(f"{reward} needs an 'answer' or 'solution' column with the gold answers")
    if len(answer) != n:
        raise ConfigError(f"{reward} got {n} completions but {len(answer)} answers")
    return [None if a is None or str(a).strip() == "" else str(a) for a in answer]
