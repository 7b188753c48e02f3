"""What a run shows: the metrics line, the bar's postfix, the completions table and log (cut back on
resume like the metrics log), and the closing block's headline numbers."""

from __future__ import annotations

import json

from thoughtfold.training.progress import (
    CompletionsLog,
    closing_block,
    completions_table,
    metrics_line,
    postfix,
)

RECORDS = [
    {"step": 1, "reward": 0.25, "loss": 0.1, "completions/mean_length": 20.0, "evictions_per_rollout": 4.0,
     "peak_memory_gb": 0.5, "rollout_tokens_per_s": 99.0},
    {"step": 2, "reward": 0.75, "loss": 0.05, "completions/mean_length": 9.0, "evictions_per_rollout": 1.5,
     "peak_memory_gb": 0.25, "eval_reward": 0.5, "rollout_tokens_per_s": 101.0},
]


def test_metrics_line_and_postfix_show_the_step_just_logged():
    line = metrics_line(RECORDS[1], max_steps=16)
    assert line.startswith("step 2/16 | reward 0.750 | loss 0.05 | length 9.0 | evictions 1.50")
    assert "eval reward 0.500" in line and line.endswith("peak memory 256.0 MiB")
    assert postfix(RECORDS[1], "reward") == {"reward": "0.75", "tok/s": "101"}


def test_completions_table_shortens_long_texts():
    rows = [{"prompt": "What is\n2 + 3?", "completion": "x" * 200, "reward": 1.0, "advantage": 0.5},
            {"prompt": "b", "completion": "c", "reward": 0.0, "advantage": -0.5}]
    table = completions_table(rows)
    assert "What is 2 + 3?" in table and "+0.500" in table and "-0.500" in table
    assert max(len(line) for line in table.splitlines()) < 140


def test_completions_log_is_cut_back_to_the_resumed_step(tmp_path):
    log = CompletionsLog(tmp_path, start_step=0)
    for step in (1, 2, 3):
        log.write(step, [{"prompt": "p", "completion": "c", "reward": 1.0, "advantage": 0.0}])
    CompletionsLog(tmp_path, start_step=2)
    steps = [json.loads(line)["step"] for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_closing_block_has_the_headline_numbers():
    lines = closing_block("grpo", RECORDS, seconds=125.0, key="reward")
    assert lines[0] == "thoughtfold: grpo finished at step 2 in 2 min 5 s"
    text = "\n".join(lines)
    assert "reward:" in text and "0.250 (first logged step) -> 0.750 (last)" in text
    assert "evictions/rollout:" in text and "eval reward:" in text
    assert "peak memory:        512.0 MiB (largest step)" in text
