"""Dataset rows: how a raw row of any source becomes an Example (which field is the prompt, which the
gold answer, what else is kept)."""

from __future__ import annotations

import pytest

from thoughtfold.errors import DataError
from thoughtfold.tasks.example import SYSTEM_PROMPT, Example, row_to_example, with_prompt_column


def test_a_row_maps_to_prompt_answer_and_its_other_columns():
    row = row_to_example({"question": "How many?", "final_answer": "7", "level": 2})
    assert isinstance(row, Example) and (row.prompt, row.answer) == ("How many?", "7") and row["level"] == 2
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "Q?"}]
    gsm8k = row_to_example({"prompt": chat, "answer": "3 + 4 = 7 apples\n#### 1,007"})
    assert (gsm8k.prompt, gsm8k.answer) == (chat, "1007")  # a conversation stays one
    assert gsm8k["solution"].startswith("3 + 4")  # the worked solution is kept for SFT
    boxed = row_to_example({"problem": "p", "solution": "so it is \\boxed{\\frac{1}{2}}"})
    assert boxed.answer == "\\frac{1}{2}"
    with pytest.raises(DataError, match="row: no prompt field .* pass prompt_field="):
        row_to_example({"text": "a", "answer": "1"})


def test_the_default_system_prompt_asks_for_a_boxed_answer():
    assert "\\boxed{" in SYSTEM_PROMPT and "step by step" in SYSTEM_PROMPT


def test_training_rows_find_their_prompt_as_files_do():
    """In-memory rows (a list, a datasets.Dataset) get their prompt where the file route looks for it;
    a conversation is checked, token ids pass, and a row without any prompt column is one line."""
    assert with_prompt_column({"question": "Q?", "solution": "4"}) == {"prompt": "Q?", "solution": "4"}
    assert with_prompt_column({"q": [1, 2], "x": 0}, prompt_field="q") == {"prompt": [1, 2], "x": 0}
    chat = [{"role": "user", "content": "Q?"}]
    assert with_prompt_column({"prompt": chat})["prompt"] == chat
    with pytest.raises(DataError, match=r"row 3 prompt: message 0 must be an object with a string"):
        with_prompt_column({"prompt": [{"role": "user", "content": 5}]}, where="row 3")
    with pytest.raises(DataError, match=r"row 0: no prompt field \(looked for prompt, problem"):
        with_prompt_column({"text": "a"}, where="row 0")
