"""Intervals for comparing methods: Newcombe's difference of proportions against published values,
and the bootstrap's coverage and pairing."""

from __future__ import annotations

import pytest
import torch

from thoughtfold.evaluation.intervals import bootstrap_interval, newcombe_interval, wilson_interval


def test_newcombe_matches_the_published_example():
    """Newcombe (1998), Table II, example (a): 56/70 vs 48/80 -> 0.0524 to 0.3339 (method 10)."""
    lo, hi = newcombe_interval(56, 70, 48, 80)
    assert lo == pytest.approx(0.0524, abs=5e-4) and hi == pytest.approx(0.3339, abs=5e-4)
    lo, hi = newcombe_interval(0, 10, 0, 20)  # both zero: an interval around 0, inside (-1, 1)
    assert -1 < lo < 0 < hi < 1


def test_bootstrap_interval_of_a_mean_covers_it_and_narrows_with_n():
    g = torch.Generator().manual_seed(1)
    small, large = torch.randn(50, generator=g) + 3, torch.randn(2000, generator=g) + 3
    lo_s, hi_s = bootstrap_interval(lambda i: small[i].mean().item(), len(small), resamples=2000)
    lo_l, hi_l = bootstrap_interval(lambda i: large[i].mean().item(), len(large), resamples=2000)
    assert lo_s < small.mean() < hi_s and lo_l < 3 < hi_l
    assert hi_l - lo_l < (hi_s - lo_s) / 3


def test_paired_bootstrap_sees_a_consistent_difference_that_unpaired_noise_hides():
    """Two methods on the same items: item difficulty (large, shared) cancels in the paired
    difference, so a small consistent gap is resolved."""
    g = torch.Generator().manual_seed(2)
    difficulty = 5 * torch.randn(200, generator=g)
    a, b = difficulty + 0.3 + 0.1 * torch.randn(200, generator=g), difficulty
    lo, hi = bootstrap_interval(lambda i: (a[i] - b[i]).mean().item(), 200, resamples=2000)
    assert 0.2 < lo < 0.3 < hi < 0.4
    with pytest.raises(ValueError):
        bootstrap_interval(lambda i: 0.0, 0)


def test_wilson_interval_by_hand():
    # k = 5 of n = 10, z = 1.96: centre 0.5, half-width 1.96 * sqrt(0.025 + 0.0096) / 1.384 = 0.2366
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0) and wilson_interval(0, 500)[0] == 0.0
