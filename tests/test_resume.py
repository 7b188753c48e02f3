"""Resuming keeps the run: the saved config.yaml is the base of a resumed run's settings and
conflicting ones are refused by name; a checkpoint of another shape is a settings conflict left in
place, a damaged one is set aside for the one before it (under a free name); a run never restarts
from step 0 silently; and a resumed run ends bit-identical to an uninterrupted one under every
eviction policy."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import yaml

from test_cli import assert_one_line_error, run_main
from test_trainer import _adapter, _config, _dataset, _deterministic, low_bytes
from thoughtfold import GRPOTrainer
from thoughtfold.config import AdapterConfig, CacheConfig
from thoughtfold.errors import ConfigError
from thoughtfold.training.checkpoint import STATE_NAME
from thoughtfold.training.metrics import read_metrics


def _train(config) -> GRPOTrainer:
    trainer = GRPOTrainer(reward_funcs=low_bytes, args=config, train_dataset=_dataset())
    trainer.train()
    return trainer


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_cli_resume_keeps_the_saved_settings_and_refuses_conflicting_ones(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--resume", f"output_dir={out}", f"model={tiny_dirs['llama']}", "device=cpu",
            "progress=false"]
    first = base[:1] + base[2:] + ["max_steps=1", "save_steps=1", "cache.window=8", "num_generations=2",
                    "prompts_per_step=1", "max_completion_length=6", "adapter.rank=4"]
    assert run_main(capsys, *first).returncode == 0
    # only output_dir and the new length are given: the window, group size and rank are the run's
    assert run_main(capsys, *base[:3], "max_steps=2").returncode == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["cache"]["window"], saved["num_generations"], saved["adapter"]["rank"]) == (8, 2, 4)
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2]

    checkpoints = _names(out / "checkpoints")
    proc = run_main(capsys, *base[:3], "max_steps=3", "adapter.rank=2", "cache.window=6")
    assert_one_line_error(proc, "adapter.rank=2 (the run has 4)", "cache.window=6 (the run has 8)",
                          "drop them to continue that run")
    assert _names(out / "checkpoints") == checkpoints  # nothing renamed, nothing started
    assert run_main(capsys, *base[:3], "max_steps=3").returncode == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == [1, 2, 3]


def test_train_resume_from_checkpoint_checks_the_saved_settings_as_resume_does(tiny_dirs, tmp_path):
    """TRL's train(resume_from_checkpoint=True | path) continues the run only with the settings it
    was started with: a conflicting one is refused by name before any checkpoint is touched."""
    _train(_config(tmp_path, tiny_dirs["llama"], max_steps=2, save_steps=1))
    checkpoints = _names(tmp_path / "run" / "checkpoints")
    step_2 = str(tmp_path / "run" / "checkpoints" / "step-00000002")
    for checkpoint in (True, step_2):
        other = _config(tmp_path, tiny_dirs["llama"], max_steps=3, save_steps=1, learning_rate=1e-3)
        trainer = GRPOTrainer(reward_funcs=low_bytes, args=other, train_dataset=_dataset())
        with pytest.raises(ConfigError, match=r"resume: learning_rate=0.001 \(the run has 0.03\)"):
            trainer.train(resume_from_checkpoint=checkpoint)
        assert _names(tmp_path / "run" / "checkpoints") == checkpoints
    same = GRPOTrainer(reward_funcs=low_bytes, args=_config(tmp_path, tiny_dirs["llama"], max_steps=3,
                                                            save_steps=1), train_dataset=_dataset())
    same.train(resume_from_checkpoint=True)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3]


def test_a_checkpoint_of_another_shape_is_a_conflict_and_stays(tiny_dirs, tmp_path):
    _train(_config(tmp_path, tiny_dirs["llama"], max_steps=2, save_steps=1))
    (tmp_path / "run" / "config.yaml").unlink()  # so that only the checkpoint can tell
    checkpoints = _names(tmp_path / "run" / "checkpoints")
    other = _config(tmp_path, tiny_dirs["llama"], max_steps=3, resume=True,
                    adapter=AdapterConfig(mode="pte", rank=2, alpha=8.0, global_tokens=4))
    with pytest.raises(ConfigError, match="step-00000002 does not fit this run's settings .*or rank"):
        GRPOTrainer(reward_funcs=low_bytes, args=other, train_dataset=_dataset())
    assert _names(tmp_path / "run" / "checkpoints") == checkpoints
    same = _config(tmp_path, tiny_dirs["llama"], max_steps=3, resume=True)
    assert GRPOTrainer(reward_funcs=low_bytes, args=same, train_dataset=_dataset()).step == 2


def test_damaged_checkpoints_are_set_aside_under_free_names(tiny_dirs, tmp_path, caplog):
    config = _config(tmp_path, tiny_dirs["llama"], max_steps=3, save_steps=1, save_total_limit=None)
    _train(config)
    root = tmp_path / "run" / "checkpoints"
    (root / "step-00000003.corrupt").mkdir()  # set aside by an earlier resume
    (root / "step-00000003" / STATE_NAME).write_bytes(b"garbage")
    state = torch.load(root / "step-00000002" / STATE_NAME, weights_only=True)
    moments = next(iter(state["optimizer"]["state"].values()))
    moments["exp_avg"] = torch.zeros(3, 3)  # loads, but does not fit the adapter beside it
    torch.save(state, root / "step-00000002" / STATE_NAME)
    resume = _config(tmp_path, tiny_dirs["llama"], max_steps=3, save_steps=1, resume=True)
    trainer = GRPOTrainer(reward_funcs=low_bytes, args=resume, train_dataset=_dataset())
    assert trainer.step == 1
    assert "optimizer state does not match the adapter" in caplog.text
    assert _names(root) == ["step-00000001", "step-00000002.corrupt", "step-00000003.corrupt",
                            "step-00000003.corrupt-2"]
    (root / "step-00000001").rename(root / "step-00000001.corrupt")
    with pytest.raises(ConfigError, match="holds only damaged checkpoints"):
        GRPOTrainer(reward_funcs=low_bytes, args=resume, train_dataset=_dataset())


def test_no_silent_restart_from_step_zero(tiny_dirs, tmp_path, caplog):
    """A run that logged steps but saved no checkpoint (killed before its first) is refused by a fresh
    run's train() (a trainer may still be made, to call train(resume_from_checkpoint=True)), and a
    resume says it starts over and drops those steps."""
    _train(_config(tmp_path, tiny_dirs["llama"], max_steps=2))
    run = tmp_path / "run"
    for path in (run / "checkpoints").iterdir():
        path.rename(run / path.name)  # out of the way: as if the run was killed before its first one
    fresh, resume = _config(tmp_path, tiny_dirs["llama"]), _config(tmp_path, tiny_dirs["llama"], resume=True)
    refused = GRPOTrainer(reward_funcs=low_bytes, args=fresh, train_dataset=_dataset())
    with pytest.raises(ConfigError, match="already holds a run: set resume=true"):
        refused.train()
    with caplog.at_level(logging.WARNING, "thoughtfold"):
        trainer = GRPOTrainer(reward_funcs=low_bytes, args=resume, train_dataset=_dataset())
    assert trainer.step == 0
    assert "starting from step 0 (the 2 steps logged before are dropped)" in caplog.text


@pytest.mark.parametrize("eviction", ["oldest", "h2o", "snapkv", "headkv"])
def test_resumed_run_is_bit_exact_under_every_eviction_policy(tiny_dirs, tmp_path, eviction):
    cache = CacheConfig(window=6, eviction=eviction)
    straight = _config(tmp_path, tiny_dirs["qwen2"], cache=cache, max_steps=3, save_steps=1,
                       output_dir=str(tmp_path / "straight"))
    _train(straight)
    parted = _config(tmp_path, tiny_dirs["qwen2"], cache=cache, max_steps=2, save_steps=1,
                     output_dir=str(tmp_path / "parted"))
    _train(parted)
    resumed = _train(_config(tmp_path, tiny_dirs["qwen2"], cache=cache, max_steps=3, save_steps=1,
                             resume=True, output_dir=str(tmp_path / "parted")))
    assert resumed.step == 3
    a, b = _adapter(tmp_path / "straight"), _adapter(tmp_path / "parted")
    assert a.keys() == b.keys() and ("eviction.head_weights" in a) == (eviction == "headkv")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert _deterministic(tmp_path / "parted" / "metrics.jsonl") == \
        _deterministic(tmp_path / "straight" / "metrics.jsonl")
    assert any(r["evictions_per_rollout"] > 0 for r in read_metrics(tmp_path / "straight" / "metrics.jsonl"))


def test_a_run_saved_before_the_residual_update_resumes_with_the_papers(tmp_path):
    """A run's config.yaml without `adapter.residual` was written when PTE's update was the paper's
    B S A: a resume keeps that form (and does not call it a conflict) whatever the default is."""
    from thoughtfold.config_files import config_to_yaml, load_config
    from thoughtfold.training.resume import check_run_settings

    out = tmp_path / "run"
    out.mkdir()
    saved = yaml.safe_load(config_to_yaml(_config(tmp_path, tmp_path / "model", output_dir=str(out))))
    del saved["adapter"]["residual"]
    (out / "config.yaml").write_text(yaml.safe_dump(saved))
    resumed = load_config(None, [f"output_dir={out}", "resume=true"])
    assert resumed.adapter.residual is False
    check_run_settings(resumed, out)
