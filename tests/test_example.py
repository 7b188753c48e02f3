"""Dataset rows: how a raw row of any source becomes an Example (which field is the prompt, which the
gold answer, what else is kept)."""

from __future__ import annotations

import pytest

from thoughtfold.errors import DataError
from thoughtfold.tasks.example import SYSTEM_PROMPT, Example, row_to_example


def test_a_row_maps_to_prompt_answer_and_its_other_columns():
    row = row_to_example({"question": "How many?", "final_answer": "7", "level": 2})
    assert isinstance(row, Example) and (row.prompt, row.answer) == ("How many?", "7") and row["level"] == 2
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "Q?"}]
    gsm8k = row_to_example({"prompt": chat, "answer": "3 + 4 = 7 apples\n#### 1,007"})
    assert (gsm8k.prompt, gsm8k.answer) == ("Q?", "1007")
    assert gsm8k["solution"].startswith("3 + 4")  # the worked solution is kept for SFT
    boxed = row_to_example({"problem": "p", "solution": "so it is \\boxed{\\frac{1}{2}}"})
    assert boxed.answer == "\\frac{1}{2}"
    with pytest.raises(DataError, match="row: no prompt field .* pass prompt_field="):
        row_to_example({"text": "a", "answer": "1"})


def test_the_default_system_prompt_asks_for_a_boxed_answer():
    assert "\\boxed{" in SYSTEM_PROMPT and "step by step" in SYSTEM_PROMPT
