"""The trainer surface a TRL user reaches for, on tiny random models (CPU, seconds each): `args`,
`state.log_history`, transformers callbacks called by the loop and obeyed, `eval_dataset` evaluated
under the cache, `save_model`, `train(resume_from_checkpoint=...)`, `processing_class` and a PEFT
`peft_config`, for both trainers."""

from __future__ import annotations

import pytest
from transformers import TrainerCallback

from conftest import byte_tokenizer
from test_trainer import _config, _dataset, low_bytes
from thoughtfold import GRPOTrainer, SFTTrainer
from thoughtfold.errors import ConfigError
from thoughtfold.policy import Policy
from thoughtfold.training.metrics import read_metrics


class Recorder(TrainerCallback):
    """Every hook it sees, with the step, and what on_log / on_evaluate were given."""

    def __init__(self, stop_at: int | None = None):
        self.events: list[tuple[str, int]] = []
        self.logs: list[dict] = []
        self.evaluations: list[dict] = []
        self.stop_at = stop_at

    def __getattribute__(self, name):
        if name.startswith("on_") and name not in ("on_log", "on_evaluate", "on_step_end"):
            return lambda args, state, control, **kw: self.events.append((name, state.global_step))
        return super().__getattribute__(name)

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("on_step_end", state.global_step))
        assert kwargs["model"] is not None and kwargs["optimizer"] is not None
        if state.global_step == self.stop_at:
            control.should_training_stop = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(("on_log", state.global_step))
        self.logs.append(dict(logs))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.events.append(("on_evaluate", state.global_step))
        self.evaluations.append(dict(metrics))


def test_callbacks_see_every_event_and_state_and_can_stop_the_run(tmp_path, tiny_dirs):
    recorder = Recorder(stop_at=3)
    config = _config(tmp_path, tiny_dirs["llama"], max_steps=6, save_steps=2, logging_steps=2)
    trainer = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset(), callbacks=[recorder])
    assert trainer.args is trainer.config and trainer.state.global_step == 0
    trainer.train()
    names = [name for name, _ in recorder.events]
    assert names[0] == "on_init_end" and names[1:3] == ["on_train_begin", "on_epoch_begin"]
    assert names[-1] == "on_train_end"
    assert [s for name, s in recorder.events if name == "on_step_end"] == [1, 2, 3]  # stopped after 3
    assert [s for name, s in recorder.events if name == "on_save"] == [2]
    assert names.count("on_optimizer_step") == 3 and names.count("on_pre_optimizer_step") == 3
    # the last step logs: log_history = the metrics log = what on_log received
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 3] == [r["step"] for r in trainer.state.log_history]
    assert recorder.logs == trainer.state.log_history == records
    assert trainer.state.global_step == 3


def test_eval_dataset_is_evaluated_under_the_cache_every_eval_steps_and_at_the_end(tmp_path, tiny_dirs):
    recorder = Recorder()
    config = _config(tmp_path, tiny_dirs["qwen2"], max_steps=3, eval_steps=2, logging_steps=3)
    trainer = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset(),
                          eval_dataset=_dataset()[:2], callbacks=[recorder])
    trainer.train()
    assert [s for name, s in recorder.events if name == "on_evaluate"] == [2, 3]
    evaluation = recorder.evaluations[0]
    assert set(evaluation) == {"eval_reward", "eval_rewards/low_bytes/mean", "eval_completions/mean_length",
                               "eval_evictions_per_rollout"}
    assert 0 <= evaluation["eval_reward"] <= 1 and evaluation["eval_evictions_per_rollout"] > 0  # window 8
    assert [("eval_reward" in r) for r in trainer.state.log_history] == [True, True]  # steps 2 and 3


def test_save_model_and_resume_from_checkpoint_as_in_trl(tmp_path, tiny_dirs):
    config = _config(tmp_path, tiny_dirs["llama"], max_steps=2, save_steps=1)
    first = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())
    first.train()
    saved = first.save_model(tmp_path / "final")
    restored = Policy.from_pretrained(adapter_path=str(saved), dtype="float32", device="cpu")
    assert restored.adapter_config == first.policy.adapter_config
    longer = _config(tmp_path, tiny_dirs["llama"], max_steps=3, save_steps=1)
    second = GRPOTrainer(reward_funcs=low_bytes, args=longer, train_dataset=_dataset())
    second.train(resume_from_checkpoint=True)  # TRL's way: built without resume, resumed by train()
    assert [r["step"] for r in second.state.log_history] == [1, 2, 3]
    third = GRPOTrainer(reward_funcs=low_bytes, args=_config(tmp_path, tiny_dirs["llama"], max_steps=3,
                                                              save_steps=1), train_dataset=_dataset())
    third.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoints" / "step-00000002"))
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_processing_class_and_peft_config_are_taken(tmp_path, tiny_dirs):
    peft = pytest.importorskip("peft")
    tokenizer = byte_tokenizer()
    config = _config(tmp_path, tiny_dirs["llama"], mode="none", max_steps=1)
    trainer = GRPOTrainer(str(tiny_dirs["llama"]), low_bytes, config, _dataset(), processing_class=tokenizer,
                          peft_config=peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    assert trainer.policy.tokenizer is tokenizer
    adapter = trainer.policy.adapter_config
    assert (adapter.mode, adapter.rank, adapter.alpha, adapter.target_modules) == ("lora", 2, 4.0,
                                                                                  ("q_proj", "v_proj"))
    assert trainer.args.adapter == adapter  # the run's saved config says what was trained
    with pytest.raises(ConfigError, match="peft_config with a Policy: the Policy has its adapter already"):
        GRPOTrainer(trainer.policy, low_bytes, config, _dataset(), peft_config=peft.LoraConfig(r=2))


def test_sft_trainer_takes_trl_arguments_and_reports_eval_loss(tmp_path, tiny_dirs):
    rows = [{"prompt": "2+2=?", "completion": "4"}, {"prompt": "3+3=?", "completion": "6"}]
    recorder = Recorder()
    config = _config(tmp_path, tiny_dirs["qwen3"], max_steps=2, prompts_per_step=2, rewards=[])
    trainer = SFTTrainer(args=config, train_dataset=rows, eval_dataset=rows, callbacks=[Recorder, recorder])
    trainer.train()
    assert recorder.evaluations and recorder.evaluations[-1]["eval_num_tokens"] > 0
    assert recorder.evaluations[-1]["eval_loss"] > 0
    with pytest.raises(ConfigError, match="data_collator must be None"):
        SFTTrainer(args=config, data_collator=object(), train_dataset=rows)
    with pytest.raises(ConfigError, match="callback object has none of TrainerCallback's hooks"):
        SFTTrainer(args=config, train_dataset=rows, callbacks=[object()])


def test_help_shows_what_the_constructors_take():
    for trainer in (GRPOTrainer, SFTTrainer):
        for argument in ("`model`", "`args`", "`train_dataset`", "`eval_dataset`", "`processing_class`",
                         "`callbacks`", "`peft_config`"):
            assert argument in trainer.__doc__, (trainer.__name__, argument)
    assert "`reward_funcs`" in GRPOTrainer.__doc__ and "`data_collator`" in SFTTrainer.__doc__
