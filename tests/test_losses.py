"""GRPO advantages and losses against hand-computed values (TRL semantics), clipping gradients,
zero-std filtering, truncation masks, and segment-wise == one-shot loss."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import assert_close_to_scale
from thoughtfold.errors import ConfigError
from thoughtfold.training.losses import (
    LossStats,
    combine_rewards,
    group_advantages,
    grpo_loss,
    loss_mask,
    loss_normalizer,
    token_loss_terms,
)

EPS = 1e-4


def approx(x, rel=1e-5, abs=1e-6):
    return pytest.approx(x, rel=rel, abs=abs)


# --------------------------------------------------------------------------- advantages


def test_group_advantages_group_scaling():
    # group 1: mean 0.25, unbiased std sqrt(0.75 / 3) = 0.5; group 2: all 1 -> std 0
    adv = group_advantages(torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1]), group_size=4, scale_rewards="group")
    hi, lo = 0.75 / (0.5 + EPS), -0.25 / (0.5 + EPS)
    assert adv.advantages.tolist() == approx([hi, lo, lo, lo, 0, 0, 0, 0])
    assert adv.zero_std.tolist() == [False] * 4 + [True] * 4
    assert adv.frac_reward_zero_std == 0.5
    assert adv.reward_std == approx(0.25)
    assert adv.group_mean.tolist() == approx([0.25] * 4 + [1.0] * 4)
    assert adv.keep_mask().tolist() == [True] * 4 + [False] * 4
    assert adv.keep_mask(filter_zero_std=False).all()


def test_group_advantages_batch_and_none_scaling():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    # batch std of the 8 rewards: mean 0.625, sum sq = 5 * 0.375^2 + 3 * 0.625^2 = 1.875, / 7
    batch_std = math.sqrt(1.875 / 7)
    adv = group_advantages(rewards, 4, "batch")
    scale = batch_std + EPS
    assert adv.advantages.tolist() == approx([0.75 / scale] + [-0.25 / scale] * 3 + [0] * 4)
    assert adv.zero_std.tolist() == [False] * 4 + [True] * 4  # still the group's std
    none = group_advantages(rewards, 4, "none")
    assert none.advantages.tolist() == approx([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])


def test_group_advantages_match_trl_formula_without_nans():
    torch.manual_seed(0)
    rewards, g = torch.rand(24), 6
    mean = rewards.view(-1, g).mean(1).repeat_interleave(g)
    std = rewards.view(-1, g).std(1).repeat_interleave(g)
    assert torch.allclose(group_advantages(rewards, g).advantages, (rewards - mean) / (std + EPS))
    assert torch.allclose(group_advantages(rewards, g, "batch").advantages,
                          (rewards - mean) / (rewards.std() + EPS))


def test_group_advantages_skip_none_rewards():
    nan = float("nan")
    rewards = torch.tensor([1.0, nan, 0.0, 0.0, nan, nan, nan, nan])
    adv = group_advantages(rewards, 4)
    std = math.sqrt((4 / 9 + 1 / 9 + 1 / 9) / 2)  # over the 3 valid rewards, mean 1/3
    scale = std + EPS
    expected = [(2 / 3) / scale, 0, (-1 / 3) / scale, (-1 / 3) / scale, 0, 0, 0, 0]
    assert adv.advantages.tolist() == approx(expected)
    assert adv.valid.tolist() == [True, False, True, True, False, False, False, False]
    assert adv.zero_std[4:].all() and not adv.zero_std[:4].any()
    assert adv.keep_mask().tolist() == [True, False, True, True, False, False, False, False]


def test_group_advantages_bad_shape():
    with pytest.raises(ConfigError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ConfigError, match="scale_rewards"):
        group_advantages(torch.zeros(4), 2, "weird")  # type: ignore[arg-type]


def test_combine_rewards_nansum():
    nan = float("nan")
    per_func = torch.tensor([[1.0, nan], [nan, nan], [0.0, 0.5]])
    out = combine_rewards(per_func, [1.0, 2.0])
    assert out[0] == 1.0 and math.isnan(out[1]) and out[2] == 1.0


# --------------------------------------------------------------------------- masks


def test_loss_mask_takes_lengths_prefixes_and_truncation():
    assert loss_mask([2, 4, 1], 4).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert loss_mask([2, 4, 1], 4, starts=[1, 0, 1]).tolist() == [[0, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    # TRL's mask_truncated_completions: a completion cut at the length limit is not trained on
    assert loss_mask([2, 4, 1], 4, truncated=[False, True, False]).tolist() == [[1, 1, 0, 0], [0, 0, 0, 0],
                                                                               [1, 0, 0, 0]]


# --------------------------------------------------------------------------- loss values

LP = [[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]]
OLD = [[-1.0, -2.2, -0.1], [-1.5, -0.5, -3.0]]
MASK = [[1, 1, 1], [1, 1, 0]]
ADV = [1.0, -2.0]
# ratios exp(lp - old): row 0: 1, e^0.2 = 1.2214 (> 1.2, A > 0: clipped to 1.2), e^-0.4 = 0.6703 (A > 0: not
# clipped); row 1: 1, e^0.3 = 1.3499 (A < 0: min picks r * A, not clipped), third token masked.
ROW0 = [-1.0, -1.2, -math.exp(-0.4)]
ROW1 = [2.0, 2.0 * math.exp(0.3)]


def _loss(loss_type, **kw):
    return grpo_loss(torch.tensor(LP), torch.tensor(OLD), torch.tensor(ADV),
                     torch.tensor(MASK, dtype=torch.float32), loss_type=loss_type, **kw)


def test_grpo_loss_value():
    loss, metrics = _loss("grpo")
    assert loss.item() == approx((sum(ROW0) / 3 + sum(ROW1) / 2) / 2)
    assert metrics == approx({"clip_ratio/low_mean": 0.0, "clip_ratio/high_mean": 0.2,
                              "clip_ratio/region_mean": 0.2})


def test_dapo_and_bnpo_loss_value():
    assert _loss("dapo")[0].item() == approx((sum(ROW0) + sum(ROW1)) / 5)
    assert _loss("bnpo")[0].item() == approx((sum(ROW0) + sum(ROW1)) / 5)
    # dapo: the global token count of a bigger batch (e.g. across processes) is the normaliser when
    # given; bnpo (TRL) always normalises by the tokens of its own micro-batch
    assert _loss("dapo", num_items_in_batch=10)[0].item() == approx((sum(ROW0) + sum(ROW1)) / 10)
    with pytest.raises(ConfigError, match="bnpo normalises by its own micro-batch"):
        _loss("bnpo", num_items_in_batch=10)


# rows of lengths 2, 4, 3, 1 in groups of 2; the second group has zero reward std, so filtering
# keeps rows 0 and 1. Each expected list is the weight of every loss token of each row, by hand.
LENGTHS = [2, 4, 3, 1]
KEPT = [True, True, False, False]


@pytest.mark.parametrize("loss_type, norm, expected", [
    ("grpo", "kept", [1 / (2 * 2), 1 / (2 * 4), 0, 0]),  # mean over 2 kept rows of per-row token means
    ("grpo", "batch", [1 / (4 * 2), 1 / (4 * 4), 1 / (4 * 3), 1 / (4 * 1)]),  # TRL: N = 4
    ("dr_grpo", "kept", [1 / (2 * 5)] * 2 + [0, 0]),  # N x max_completion_length (5)
    ("dr_grpo", "batch", [1 / (4 * 5)] * 4),
    ("dapo", "kept", [1 / 6] * 2 + [0, 0]),  # 6 kept tokens
    ("dapo", "batch", [1 / 10] * 4),  # TRL: all 10 tokens of the batch
    # 2 processes of 2 rows, one micro-batch each: each its own token count, then DDP's mean (/2)
    ("bnpo", "kept", [1 / (6 * 2)] * 2 + [0, 0]),
    ("bnpo", "batch", [1 / (6 * 2)] * 2 + [1 / (4 * 2)] * 2),
])
def test_batch_loss_weights_by_hand(loss_type, norm, expected):
    from thoughtfold.training.losses import batch_loss_weights

    mask = (torch.arange(5)[None] < torch.tensor(LENGTHS)[:, None]).float()
    counted = torch.tensor(KEPT) if norm == "kept" else torch.ones(4, dtype=torch.bool)
    weights = batch_loss_weights(mask, counted, loss_type, max_completion_length=5, processes=2)
    assert weights.tolist() == [approx([w] * n + [0.0] * (5 - n)) for w,
                                n in zip(expected, LENGTHS, strict=True)]
    if loss_type != "bnpo":  # one process or two: the same normalisation of the whole batch
        assert torch.equal(weights, batch_loss_weights(mask, counted, loss_type, 5))


def test_bnpo_normalises_each_micro_batch_then_averages():
    """TRL: loss = mean over processes of (1/G) sum over the G micro-batches of the micro-batch's
    token mean. Two processes, micro-batches of one row: each row's weight is 1/(n_i * 2 * 2)."""
    from thoughtfold.training.losses import batch_loss_weights

    mask = (torch.arange(5)[None] < torch.tensor(LENGTHS)[:, None]).float()
    weights = batch_loss_weights(mask, torch.ones(4, dtype=torch.bool), "bnpo", processes=2,
                                 micro_batches=[(0, 1), (1, 2)])
    # every micro-batch's tokens: weight 1/(2 x 2) in all
    assert weights.sum(1).tolist() == approx([1 / 4] * 4)
    assert weights[1, 0].item() == approx(1 / (4 * 2 * 2))


def test_dr_grpo_loss_value():
    assert _loss("dr_grpo", max_completion_length=4)[0].item() == approx((sum(ROW0) + sum(ROW1)) / (2 * 4))
    assert _loss("dr_grpo")[0].item() == approx((sum(ROW0) + sum(ROW1)) / (2 * 3))  # default: T


def test_kl_term_and_metric():
    lp = torch.tensor([[-1.0, -1.0]])
    ref = torch.tensor([[-0.5, -1.5]])  # ref - lp = +0.5, -0.5
    kl = [math.exp(0.5) - 1.5, math.exp(-0.5) - 0.5]
    loss, metrics = grpo_loss(lp, None, torch.tensor([0.0]), torch.ones(1, 2), beta=0.1, ref_logprobs=ref)
    assert loss.item() == approx(0.1 * sum(kl) / 2)
    assert metrics["kl"] == approx(sum(kl) / 2)
    _, no_beta = grpo_loss(lp, None, torch.tensor([0.0]), torch.ones(1, 2), ref_logprobs=ref)
    assert no_beta["kl"] == approx(sum(kl) / 2)  # logged, not in the loss
    with pytest.raises(ConfigError, match="ref_logprobs"):
        grpo_loss(lp, None, torch.tensor([0.0]), torch.ones(1, 2), beta=0.1)


def test_on_policy_loss_is_minus_advantage_mean():
    """num_iterations = 1: old = logp.detach(), ratio 1, loss = -mean(A) with grpo weights."""
    lp = torch.tensor([[-1.0, -2.0], [-0.3, -0.1]])
    loss, _ = grpo_loss(lp, None, torch.tensor([2.0, -1.0]), torch.ones(2, 2))
    assert loss.item() == approx(-(2.0 - 1.0) / 2)


# --------------------------------------------------------------------------- clipping gradients


def test_clipping_zeroes_gradient_where_trl_does():
    # four one-token sequences: (ratio, advantage) = (1.5, +1), (1.5, -1), (0.5, +1), (0.5, -1)
    old = torch.zeros(4, 1)
    lp = torch.log(torch.tensor([[1.5], [1.5], [0.5], [0.5]])).requires_grad_()
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, metrics = grpo_loss(lp, old, adv, torch.ones(4, 1), loss_type="dapo", epsilon_low=0.2,
                              epsilon_high=0.2)
    loss.backward()
    # d(-r A)/dlogp = -r A, / 4 tokens; zero where the clipped branch is the min (constant in logp)
    assert lp.grad.squeeze(1).tolist() == approx([0.0, 1.5 / 4, -0.5 / 4, 0.0])
    assert metrics == approx({"clip_ratio/low_mean": 0.25, "clip_ratio/high_mean": 0.25,
                              "clip_ratio/region_mean": 0.5})


def test_asymmetric_epsilon():
    old = torch.zeros(2, 1)
    lp = torch.log(torch.tensor([[1.25], [0.7]])).requires_grad_()
    # eps_high = 0.28 (DAPO's clip-higher): ratio 1.25 with A > 0 is inside the region and learns;
    # ratio 0.7 with A < 0 is below 1 - eps_low = 0.8: clipped, no gradient
    loss, metrics = grpo_loss(lp, old, torch.tensor([1.0, -1.0]), torch.ones(2, 1), "dapo",
                              epsilon_low=0.2, epsilon_high=0.28)
    loss.backward()
    assert loss.item() == approx((-1.25 + 0.8) / 2)
    assert lp.grad.squeeze(1).tolist() == approx([-1.25 / 2, 0.0])
    assert metrics["clip_ratio/high_mean"] == 0.0 and metrics["clip_ratio/low_mean"] == 0.5


# --------------------------------------------------------------------------- segments == one shot


def _random_batch(n=4, t=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(n, t, generator=g) * 3
    old = lp + 0.3 * torch.randn(n, t, generator=g)
    ref = lp + 0.2 * torch.randn(n, t, generator=g)
    adv = torch.randn(n, generator=g)
    lengths = torch.tensor([t, 3, 7, 1])[:n]
    mask = (torch.arange(t).expand(n, -1) < lengths.unsqueeze(1)).float()
    return lp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo", "dr_grpo"])
def test_segment_sum_equals_one_shot_loss_and_grad(loss_type):
    lp, old, ref, adv, mask = _random_batch()
    full_lp = lp.clone().requires_grad_()
    full, full_metrics = grpo_loss(full_lp, old, adv, mask, loss_type, beta=0.05, ref_logprobs=ref,
                                   max_completion_length=16)
    full.backward()

    seg_lp = lp.clone().requires_grad_()
    weights = loss_normalizer(mask, loss_type, max_completion_length=16)  # from the WHOLE mask
    total, stats = torch.zeros(()), LossStats()
    for start, end in [(0, 2), (2, 7), (7, 12)]:  # backward per segment, as the replay does
        terms, seg_stats = token_loss_terms(seg_lp[:, start:end], old[:, start:end], adv,
                                            weights[:, start:end], mask[:, start:end], beta=0.05,
                                            ref_logprobs=ref[:, start:end])
        terms.sum().backward()
        total += terms.sum().detach()
        stats = stats + seg_stats
    assert total.item() == approx(full.item())
    assert_close_to_scale(seg_lp.grad, full_lp.grad, rel=1e-5)
    assert stats.metrics() == approx(full_metrics)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_with_global_normaliser_equal_full_batch(loss_type):
    lp, old, _, adv, mask = _random_batch()
    full, _ = grpo_loss(lp, old, adv, mask, loss_type, max_completion_length=12)
    kw = dict(num_sequences=4, num_items_in_batch=mask.sum().item(), max_completion_length=12)
    parts = [grpo_loss(lp[rows], old[rows], adv[rows], mask[rows], loss_type, **kw)[0]
             for rows in (slice(0, 2), slice(2, 4))]
    assert sum(p.item() for p in parts) == approx(full.item())


def test_zero_std_filtering_removes_groups_from_loss():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])  # group 2 has no signal
    adv = group_advantages(rewards, 2)
    mask = torch.ones(4, 3) * adv.keep_mask().unsqueeze(1)
    lp = torch.full((4, 3), -1.0, requires_grad=True)
    loss, metrics = grpo_loss(lp, None, adv.advantages, mask, "dapo")
    loss.backward()
    assert lp.grad[2:].abs().sum() == 0 and lp.grad[:2].abs().sum() > 0
    assert loss.item() == approx(-(adv.advantages[0] + adv.advantages[1]).item() * 3 / 6, abs=1e-6)


def test_unknown_loss_type():
    with pytest.raises(ConfigError, match="loss_type"):
        loss_normalizer(torch.ones(1, 1), "ppo")  # type: ignore[arg-type]
