"""The metrics log: lines averaged over `logging_steps` as TRL logs them."""

from __future__ import annotations

import pytest

from thoughtfold.metrics import mean_metrics


def test_mean_metrics_averages_since_the_last_line_and_keeps_the_position():
    steps = [{"step": 3, "epoch": 0.5, "learning_rate": 1e-3, "reward": 0.2, "peak_memory_gb": 1.5, "kl": 0.0},
             {"step": 4, "epoch": 0.75, "learning_rate": 5e-4, "reward": 0.6, "peak_memory_gb": 1.0, "kl": 0.1}]
    assert mean_metrics(steps) == pytest.approx(
        {"step": 4, "epoch": 0.75, "learning_rate": 5e-4, "reward": 0.4, "peak_memory_gb": 1.5, "kl": 0.05})
    assert mean_metrics(steps[:1]) == steps[0]
