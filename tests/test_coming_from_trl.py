"""A script written for TRL runs on thoughtfold with only its import line changed and the cache and
adapter settings added: TRL's config names, its constructor, a transformers callback, a
conversational `datasets.Dataset` with TRL's `solution` column, rewards reading conversational
completions, `report_to="none"`, evaluation, `state.log_history` and `save_model`."""

from __future__ import annotations

import difflib

import pytest

TRL_SCRIPT = '''
from datasets import Dataset
from transformers import TrainerCallback
from trl import GRPOConfig, GRPOTrainer

dataset = Dataset.from_list([
    {"prompt": [{"role": "user", "content": f"What is {a} + {b}?"}], "solution": str(a + b)}
    for a, b in [(2, 3), (4, 4), (1, 6), (5, 2)]
])


def correct(completions, solution, **kwargs):
    return [float(s in c[0]["content"]) for c, s in zip(completions, solution)]


def brief(completions, **kwargs):
    return [-len(c[0]["content"]) / 100 for c in completions]


class StepLog(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.steps.append((state.global_step, round(logs["reward"], 6)))


step_log = StepLog()
training_args = GRPOConfig(
    output_dir=OUTPUT_DIR,
    learning_rate=1e-4,
    per_device_train_batch_size=4,
    gradient_accumulation_steps=2,
    num_generations=4,
    max_completion_length=12,
    max_steps=2,
    logging_steps=1,
    bf16=True,
    gradient_checkpointing=True,
    epsilon_high=None,
    scale_rewards=True,
    log_completions=True,
    eval_strategy="steps",
    eval_steps=2,
    report_to="none",
)
trainer = GRPOTrainer(
    model=MODEL,
    reward_funcs=[correct, brief],
    args=training_args,
    train_dataset=dataset,
    eval_dataset=dataset.select(range(2)),
    callbacks=[step_log],
)
trainer.train()
trainer.save_model(OUTPUT_DIR + "/final")
history = trainer.state.log_history
'''


def as_thoughtfold(script: str) -> str:
    """The TRL script with its import line changed and the cache and adapter settings added."""
    script = script.replace("from trl import", "from thoughtfold import")
    return script.replace("    report_to=\"none\",\n", "    report_to=\"none\",\n"
                          "    cache={\"window\": 4},\n"
                          "    adapter={\"mode\": \"pte\", \"rank\": 4, \"global_tokens\": 2},\n")


def test_only_the_import_and_the_cache_and_adapter_settings_change():
    diff = [line for line in difflib.ndiff(TRL_SCRIPT.splitlines(), as_thoughtfold(TRL_SCRIPT).splitlines())
            if line[:2] in ("- ", "+ ")]
    assert diff == ["- from trl import GRPOConfig, GRPOTrainer",
                    "+ from thoughtfold import GRPOConfig, GRPOTrainer",
                    '+     cache={"window": 4},',
                    '+     adapter={"mode": "pte", "rank": 4, "global_tokens": 2},']


def test_a_trl_script_runs(tmp_path, tiny_dirs, capsys):
    pytest.importorskip("datasets")
    namespace = {"MODEL": str(tiny_dirs["qwen2"]), "OUTPUT_DIR": str(tmp_path / "out"), "__name__": "script"}
    exec(compile(as_thoughtfold(TRL_SCRIPT), "trl_script.py", "exec"), namespace)
    history, trainer = namespace["history"], namespace["trainer"]
    assert [step for step, _ in namespace["step_log"].steps] == [1, 2]
    assert [r["step"] for r in history] == [1, 2] and "eval_reward" in history[-1]
    assert trainer.args.prompts_per_step == 2 and trainer.args.replay_batch_size == 4  # 8 completions / 4
    assert history[0]["evictions_per_rollout"] > 0  # window 4: the cache is bounded
    assert (tmp_path / "out" / "final" / "adapter.safetensors").is_file()
    assert (tmp_path / "out" / "completions.jsonl").is_file()
    err = capsys.readouterr().err
    assert "step 2/2 | reward" in err and "| prompt" in err and "finished at step 2" in err
