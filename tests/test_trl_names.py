"""TRL's configuration names: each maps to one of ours, translates (batch sizes count prompts per
step here), changes nothing, or is refused with one line saying what to use, in Python, YAML and
overrides alike; `report_to`, `epsilon_high=None`, boolean `scale_rewards` and dict sub-settings
as TRL users write them; and every setting documented where help() shows it."""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import fields
from pathlib import Path

import pytest

from thoughtfold import CacheConfig, ConfigError, GRPOConfig, SFTConfig, TrainConfig, load_config
from thoughtfold.settings_help import SETTINGS_HELP, default_settings
from thoughtfold.trl_names import (
    IGNORED,
    NO_EFFECT,
    RENAMED,
    SFT_RENAMED,
    TRL_BATCH_DEFAULTS,
    adapter_from_peft,
    is_trl_name,
    report_backends,
)

ROOT = Path(__file__).resolve().parent.parent


def one_line_error(match: str, **settings) -> str:
    with pytest.raises(ConfigError, match=match) as info:
        TrainConfig(**settings)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_batch_sizes_count_completions_in_trl_and_prompts_per_step_here():
    grpo = GRPOConfig(per_device_train_batch_size=16, gradient_accumulation_steps=2, num_generations=8)
    assert (grpo.prompts_per_step, grpo.replay_batch_size) == (4, 16)  # 32 completions = 4 groups of 8
    assert TrainConfig(per_device_train_batch_size=8).prompts_per_step == 1  # TRL's num_generations 8
    sft = SFTConfig(per_device_train_batch_size=2, gradient_accumulation_steps=3)
    assert (sft.prompts_per_step, sft.replay_batch_size) == (6, 2)  # SFT's batch counts traces
    one_line_error("= 12 completions is not a multiple of num_generations = 8: thoughtfold counts prompts",
                   per_device_train_batch_size=12)
    one_line_error("per_device_train_batch_size and prompts_per_step set the same thing; keep one",
                   per_device_train_batch_size=8, prompts_per_step=2)


def test_trl_values_that_mean_the_same_here_are_taken():
    config = TrainConfig(epsilon=0.3, epsilon_high=None, scale_rewards=False, shuffle_dataset=False,
                         disable_tqdm=True, bf16=True, gradient_checkpointing=True, logging_dir="x",
                         remove_unused_columns=False, use_vllm=False, push_to_hub=False, run_name="r",
                         eval_strategy="steps", eval_steps=5, save_strategy="no", fp16=False, tf32=True)
    assert config.epsilon_high == 0.3  # TRL: the same bound on both sides
    assert config.scale_rewards == "none" and TrainConfig(scale_rewards=True).scale_rewards == "group"
    assert (config.data.shuffle, config.progress) == (False, False)
    assert (config.eval_steps, config.save_steps) == (5, 0)
    assert config.dtype is None  # bf16: bfloat16 on CUDA is the default already
    assert TrainConfig(bf16=False).dtype == "float32" and TrainConfig(fp16=True).dtype == "float16"
    assert TrainConfig(model_init_kwargs={"torch_dtype": "bfloat16"}).dtype == "bfloat16"


@pytest.mark.parametrize("settings, words", [
    ({"push_to_hub": True}, "push_to_hub=True has no counterpart here: upload output_dir/adapter"),
    ({"use_vllm": True}, "use_vllm=True has no counterpart here: rollouts run in thoughtfold's"),
    ({"eval_strategy": "epoch"}, "thoughtfold counts steps: use eval_strategy='steps' or 'no'"),
    ({"repetition_penalty": 1.1}, "sampling has no repetition penalty here"),
    ({"optim": "sgd"}, "the optimizer is AdamW"),
    ({"lernin_rate": 1e-5}, "unknown setting 'lernin_rate'; did you mean 'learning_rate'"),
    ({"auto_find_batch_size": True}, "'auto_find_batch_size' is a transformers TrainingArguments setting "
                                     "with no counterpart here: remove it"),
    ({"cache": {"windw": 8}}, "unknown setting 'cache.windw'; did you mean 'cache.window'"),
    ({"adapter": 3}, "adapter must be a AdapterConfig or a dict of its settings"),
    ({"report_to": "mlflow"}, "report_to accepts tensorboard, wandb, 'all' or 'none', got 'mlflow'"),
])
def test_what_has_no_counterpart_is_one_line_naming_what_to_use(settings, words):
    one_line_error(words, **settings)


def test_sft_names_translate_in_sft_config():
    sft = SFTConfig(max_length=256, loss_type="nll", completion_only_loss=None, packing=False)
    assert (sft.max_completion_length, sft.sft_loss, sft.loss_type) == (256, "nll", "dapo")
    with pytest.raises(ConfigError, match="packing=True has no counterpart here: each trace is replayed"):
        SFTConfig(packing=True)
    with pytest.raises(ConfigError, match="loss_type='dft' has no counterpart here"):
        SFTConfig(loss_type="dft")


def test_dict_sub_settings_convert_at_construction():
    config = TrainConfig(cache={"window": 8, "evict_ratio": 0.5}, adapter={"mode": "lora", "rank": 4},
                         data={"dataset": "arith:easy"})
    assert config.cache == CacheConfig(window=8, evict_ratio=0.5)
    assert (config.adapter.mode, config.adapter.rank, config.data.dataset) == ("lora", 4, "arith:easy")
    one_line_error("window must be >= 1", cache={"window": 0})  # checked now, not after the model loads


def test_report_to_as_trl_takes_it():
    assert report_backends("none") == [] and report_backends(["none"]) == [] and report_backends([]) == []
    installed = [b for b in ("tensorboard", "wandb") if importlib.util.find_spec(b) is not None]
    assert report_backends("all") == installed
    assert TrainConfig(report_to="none").report_to == []
    for backend in ("tensorboard", "wandb"):
        if backend in installed:
            assert TrainConfig(report_to=backend).report_to == [backend]
        else:  # checked when the config is built, not after the model loads
            one_line_error(f"report_to {backend} needs the {backend} package: pip install {backend}",
                           report_to=backend)


def test_run_length_in_epochs_and_warmup_as_a_ratio_follow_trl():
    config = TrainConfig(num_train_epochs=2, warmup_ratio=0.1, prompts_per_step=4)
    resolved = config.for_dataset(rows=30)  # what the trainer does once the dataset is loaded
    assert (resolved.max_steps, resolved.warmup_steps) == (15, 2)
    assert (resolved.num_train_epochs, resolved.warmup_ratio) == (None, None)
    assert TrainConfig(max_steps=-1).num_train_epochs == 3.0  # TRL's "train num_train_epochs" (default 3)
    assert TrainConfig(max_steps=-1, num_train_epochs=1).for_dataset(rows=8).max_steps == 2


def test_yaml_and_overrides_take_trl_names_too(tmp_path):
    path = tmp_path / "trl.yaml"
    path.write_text("per_device_train_batch_size: 16\nreport_to: none\nbf16: true\nscale_rewards: false\n"
                    "epsilon_high: null\n")
    config = load_config(path, ["gradient_checkpointing=true", "num_train_epochs=1"])
    assert (config.prompts_per_step, config.report_to, config.scale_rewards) == (2, [], "none")
    assert config.num_train_epochs == 1.0 and config.epsilon_high == config.epsilon
    sft = load_config(None, ["max_length=64", "per_device_train_batch_size=2"], SFTConfig)
    assert isinstance(sft, SFTConfig) and (sft.max_completion_length, sft.prompts_per_step) == (64, 2)
    with pytest.raises(ConfigError, match="override: unknown setting 'per_device_batch_size'; did you mean"):
        load_config(None, ["per_device_batch_size=8"])


def test_peft_lora_config_maps_to_the_adapter(caplog):
    peft = pytest.importorskip("peft")
    base = TrainConfig().adapter
    mapped = adapter_from_peft(peft.LoraConfig(r=16, lora_alpha=32, target_modules=["v_proj", "q_proj"]),
                               base)
    assert (mapped.mode, mapped.rank, mapped.alpha) == ("pte", 16, 32.0)
    assert mapped.target_modules == ("q_proj", "v_proj")
    lora = adapter_from_peft(peft.LoraConfig(r=4, target_modules="all-linear"),
                             TrainConfig(adapter={}).adapter)
    assert lora.mode == "lora" and lora.target_modules == base.target_modules
    with pytest.raises(ConfigError, match="peft_config.use_dora=True has no counterpart here"):
        adapter_from_peft(peft.LoraConfig(r=4, use_dora=True), base)
    with caplog.at_level(logging.WARNING, logger="thoughtfold"):
        adapter_from_peft(peft.LoraConfig(r=4, lora_dropout=0.05), base)
    assert "lora_dropout=0.05 is not applied" in caplog.text


def test_every_setting_has_one_line_of_help_shown_by_help():
    settings = default_settings(TrainConfig())
    assert set(settings) == set(SETTINGS_HELP)
    for name in settings:
        assert f"    {name} (" in TrainConfig.__doc__
    assert "per_device_train_batch_size" in GRPOConfig.__doc__ or "TRL" in GRPOConfig.__doc__
    assert not set(NO_EFFECT) & set(IGNORED)


def test_the_docs_list_every_trl_name_and_the_readme_table_names_only_known_ones():
    page = (ROOT / "docs" / "coming-from-trl.md").read_text(encoding="utf-8")
    for name in [*RENAMED, *SFT_RENAMED, *NO_EFFECT, *IGNORED, *TRL_BATCH_DEFAULTS]:
        assert f"`{name}`" in page, name
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme[readme.index("| TRL | thoughtfold |"):].split("\n\n")[0]
    ours = {f.name for f in fields(TrainConfig)}
    trainer = {"trainer", "train", "args", "state", "log_history", "save_model", "evaluate", "peft_config",
               "solution", "messages", "prompt", "completion", "r", "lora_alpha", "target_modules", "dtype",
               "role"}
    for row in table.splitlines()[2:]:
        for span in re.findall(r"`([^`]*)`", row.split(" | ")[0]):
            name = re.match(r"[a-z_0-9]*", span).group()
            assert not name or name in ours or is_trl_name(name) or name in trainer, name
