"""TrainConfig and its YAML form: TRL's GRPOConfig names are the fields, the names earlier versions
used still load (a saved run config must resume), and bad settings are one-line ConfigErrors."""

from __future__ import annotations

from pathlib import Path

import pytest

from thoughtfold.errors import ConfigError
from thoughtfold.tasks.data import SYSTEM_PROMPT
from thoughtfold.train_config import LEGACY_NAMES, TrainConfig, config_to_yaml, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

TRL_SETTINGS = dict(num_generations=4, learning_rate=1e-4, max_steps=2, max_completion_length=64,
                    save_steps=1, lr_scheduler_type="cosine", epsilon=0.1, epsilon_high=0.28)


def test_trl_names_are_the_fields_and_legacy_yaml_loads_to_the_same_config(tmp_path):
    config = TrainConfig(**TRL_SETTINGS)
    assert (config.num_generations, config.learning_rate, config.max_steps) == (4, 1e-4, 2)
    legacy = tmp_path / "config.yaml"  # as an earlier version saved it next to a run
    legacy.write_text("group_size: 4\nlr: 1.0e-4\nsteps: 2\nmax_new_tokens: 64\nsave_every: 1\n"
                      "lr_scheduler: cosine\nepsilon_low: 0.1\nepsilon_high: 0.28\n")
    assert load_config(legacy) == config
    assert set(LEGACY_NAMES.values()) <= set(TRL_SETTINGS)  # every legacy name maps to a current field


def test_saved_config_reloads_and_a_later_layer_wins_across_spellings(tmp_path):
    config = TrainConfig(**TRL_SETTINGS, logging_steps=5)
    saved = tmp_path / "config.yaml"
    saved.write_text(config_to_yaml(config))
    assert "learning_rate: 0.0001" in saved.read_text() and "\nlr:" not in saved.read_text()
    assert load_config(saved) == config
    assert load_config(saved, ["lr=3e-4"]).learning_rate == 3e-4
    assert load_config(saved, ["steps=7"]).max_steps == 7


def test_load_config_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("cache: {window: 16}\nadapter: {mode: lora, rank: 4}\nrewards: [arith, format]\nlearning_rate: 1.0e-3\n")
    config = load_config(path, ["learning_rate=5e-4", "cache.window=null", "data.dataset=arith:medium"])
    assert config.cache.window is None and config.adapter.mode == "lora" and config.adapter.rank == 4
    assert config.learning_rate == 5e-4 and config.rewards == ["arith", "format"] and config.data.dataset == "arith:medium"


@pytest.mark.parametrize("override, words", [
    ("loss_type=ppo", "loss_type must be one of"),
    ("backprop=bogus", "backprop must be one of"),
    ("learnin_rate=1e-5", "unknown setting 'learnin_rate'; did you mean 'learning_rate'"),
    ("max_steps=2 steps=3", "'max_steps' and 'steps' set the same thing"),
    ("learning_rate=fast", "could not be converted"),
    ("learning_rate", "key=value"),
    ("adapter.mode=dora", "adapter mode must be one of"),
    ("num_generations=0", "num_generations must be >= 1"),
    ("logging_steps=0", "logging_steps must be >= 1"),
    ("report_to=[mlflow]", "report_to accepts"),
])
def test_bad_config_is_one_line_config_error(override, words):
    with pytest.raises(ConfigError, match=words) as info:
        load_config(None, override.split())
    assert "\n" not in str(info.value)


def test_missing_or_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("learning_rate: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(broken)


def test_quickstart_yaml_is_the_default_run():
    quickstart = load_config(CONFIGS / "quickstart.yaml")
    assert quickstart == TrainConfig(overwrite_output_dir=True)


@pytest.mark.parametrize("name, mode, window", [("paper-qwen2.5-3b", "pte", 1024), ("lora-full", "lora", None),
                                                ("lora-window", "lora", 1024)])
def test_paper_configs(name, mode, window):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert (config.adapter.mode, config.cache.window) == (mode, window)
    assert (config.model, config.data.dataset, config.learning_rate, config.max_completion_length, config.adapter.rank) == (
        "Qwen/Qwen2.5-3B-Instruct", "dapo-math-17k", 1e-5, 3072, 32)
    assert config.num_generations * config.prompts_per_step == 512
    assert config.adapter.global_tokens == (32 if mode == "pte" else 0)
    assert config.data.system_prompt == SYSTEM_PROMPT
