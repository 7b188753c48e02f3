"""TrainConfig and its YAML form: TRL's GRPOConfig names are the fields, the names earlier versions
used still load (a saved run config must resume), and bad settings are one-line ConfigErrors."""

from __future__ import annotations

from thoughtfold.train_config import LEGACY_NAMES, TrainConfig, config_to_yaml, load_config

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
