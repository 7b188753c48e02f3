"""The metrics log: lines averaged over `logging_steps` as TRL logs them, and a resume's rewrite
that a kill cannot cut short."""

from __future__ import annotations

import json
import os
import resource

import pytest

from thoughtfold.training.metrics import MetricsLogger, StepMemory, mean_metrics, read_metrics


def test_mean_metrics_averages_since_the_last_line_and_keeps_the_position():
    peak = "peak_memory_gb"
    steps = [{"step": 3, "epoch": 0.5, "learning_rate": 1e-3, "reward": 0.2, peak: 1.5, "kl": 0.0},
             {"step": 4, "epoch": 0.75, "learning_rate": 5e-4, "reward": 0.6, peak: 1.0, "kl": 0.1}]
    assert mean_metrics(steps) == pytest.approx(
        {"step": 4, "epoch": 0.75, "learning_rate": 5e-4, "reward": 0.4, peak: 1.5, "kl": 0.05})
    assert mean_metrics(steps[:1]) == steps[0]


def test_metrics_rewrite_at_resume_is_atomic(tmp_path, monkeypatch):
    """A kill between writing the kept lines and replacing the file leaves the whole history."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 0.5}) + "\n" for s in (1, 2, 3)))

    def killed(src, dst):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        MetricsLogger(tmp_path, [], start_step=2, config={})
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]
    monkeypatch.undo()
    MetricsLogger(tmp_path, [], start_step=2, config={}).close()
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_step_memory_on_cpu_is_the_steps_own_rss_high_water_not_the_lifetime_peak():
    """A big allocation freed before the step does not count; one made inside the step does."""
    torch = pytest.importorskip("torch")
    before = torch.ones(256 * 2**20 // 4)  # 256 MiB, freed before the step starts
    del before
    lifetime_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    memory = StepMemory(torch.device("cpu"))
    memory.start()
    quiet = memory.metrics()
    if not quiet:
        pytest.skip("this system lets no process reset its resident-set high-water mark")
    assert quiet["peak_memory_gb"] < (lifetime_kib - 192 * 1024) / 2**20
    memory.start()
    inside = torch.ones(64 * 2**20 // 4)  # 64 MiB within the step
    del inside
    assert memory.metrics()["peak_memory_gb"] >= quiet["peak_memory_gb"] + 48 / 1024
