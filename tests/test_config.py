"""The settings: every bad setting is a ConfigError with a message naming the setting; TrainConfig's
YAML form takes TRL's GRPOConfig names, and the names earlier versions used still load (a saved run
config must resume)."""

from __future__ import annotations

from pathlib import Path

import pytest

from thoughtfold import AdapterConfig, CacheConfig, ConfigError
from thoughtfold.config import TrainConfig
from thoughtfold.config_files import LEGACY_NAMES, config_to_yaml, load_config
from thoughtfold.tasks.example import SYSTEM_PROMPT


@pytest.mark.parametrize("window,ratio,block", [(8, 0.25, 2), (10, 0.25, 3), (7, 1.0, 7), (12, 0.3, 4),
                                                (1, 0.25, 1), (100, 0.01, 1)])
def test_evict_block_is_ceil_of_ratio_times_window(window, ratio, block):
    assert CacheConfig(window=window, evict_ratio=ratio).evict_block == block


@pytest.mark.parametrize("kwargs,match", [
    ({"window": 0}, "window must be >= 1"),
    ({"window": -3}, "window must be >= 1"),
    ({"window": 2.5}, "window must be an integer"),
    ({"window": 8, "evict_ratio": 0.0}, "evict_ratio must be in"),
    ({"window": 8, "evict_ratio": 1.5}, "evict_ratio must be in"),
])
def test_bad_cache_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        CacheConfig(**kwargs)


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "qlora"}, "adapter mode must be one of"),
    ({"rank": 0}, "rank must be"),
    ({"global_tokens": -1}, "global_tokens"),
    ({"state_update": "sum"}, "state_update"),
    ({"target_modules": ()}, "target_modules is empty"),
])
def test_bad_adapter_settings(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AdapterConfig(**kwargs)


def test_full_cache_has_no_eviction_block():
    assert not CacheConfig().bounded
    with pytest.raises(ConfigError):
        _ = CacheConfig().evict_block


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
    path.write_text("cache: {window: 16}\nadapter: {mode: lora, rank: 4}\n"
                    "rewards: [arith, format]\nlearning_rate: 1.0e-3\n")
    config = load_config(path, ["learning_rate=5e-4", "cache.window=null", "data.dataset=arith:medium"])
    assert config.cache.window is None and config.adapter.mode == "lora" and config.adapter.rank == 4
    assert config.learning_rate == 5e-4 and config.rewards == ["arith", "format"]
    assert config.data.dataset == "arith:medium"


@pytest.mark.parametrize("override, words", [
    ("loss_type=ppo", "loss_type must be one of"),
    ("backprop=bogus", "backprop must be one of"),
    ("learnin_rate=1e-5", "unknown setting 'learnin_rate'; did you mean 'learning_rate'"),
    ("max_steps=2 steps=3", "'max_steps' and 'steps' set the same thing"),
    ("learning_rate=fast", "could not be converted"),
    ("learning_rate", "not KEY=VALUE"),
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
    assert quickstart == TrainConfig(overwrite_output_dir=True, log_completions=True)


@pytest.mark.parametrize("name, mode, window", [("paper-qwen2.5-3b", "pte", 1024),
                                                ("lora-full", "lora", None), ("lora-window", "lora", 1024)])
def test_paper_configs(name, mode, window):
    config = load_config(CONFIGS / f"{name}.yaml")
    assert (config.adapter.mode, config.cache.window) == (mode, window)
    assert (config.model, config.data.dataset, config.learning_rate, config.max_completion_length,
            config.adapter.rank) == ("Qwen/Qwen2.5-3B-Instruct", "dapo-math-17k", 1e-5, 3072, 32)
    assert config.num_generations * config.prompts_per_step == 512
    assert config.adapter.global_tokens == (32 if mode == "pte" else 0)
    assert config.data.system_prompt == SYSTEM_PROMPT


def test_reading_the_settings_imports_neither_torch_nor_transformers():
    """Settings are plain data: a script (or the CLI's argument parsing) that only reads them starts
    instantly, whatever the engine needs."""
    import subprocess
    import sys

    code = ("import sys\nfrom thoughtfold import TrainConfig, load_config\n"
            "TrainConfig()\nload_config(None, ['max_steps=2'])\n"
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
