"""GRPO maths in plain torch, with TRL GRPOTrainer's semantics and metric names: rewards ->
group advantages, the loss mask, batch-wide token weights, and the clipped per-token loss.

The trainer backpropagates segment by segment (the replay), so the loss is written as a sum of
per-token terms: :func:`loss_normalizer` gives each token its weight from the *whole* batch's
mask, and :func:`token_loss_terms` computes ``weight * per_token_loss`` for any slice of tokens.
Summing the terms of all segments (and micro-batches, given the global counts) equals
:func:`grpo_loss` on the full batch.

Shapes: ``N`` sequences (prompts x ``group_size`` completions, grouped contiguously), ``T`` tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..config import LOSS_TYPES, SCALE_REWARDS, check_choice
from ..errors import ConfigError

LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo"]
ScaleRewards = Literal["group", "batch", "none"]
STD_EPS = 1e-4  # TRL: advantages / (std + 1e-4)


# --------------------------------------------------------------------------- rewards -> advantages


def combine_rewards(rewards_per_func: torch.Tensor,
                    weights: torch.Tensor | list[float] | None = None) -> torch.Tensor:
    """Weighted sum over reward functions ``[N, F] -> [N]`` where None (NaN) entries are skipped,
    as TRL does with ``nansum``; a sample with no reward at all stays NaN (skipped downstream)."""
    if rewards_per_func.dim() == 1:
        rewards_per_func = rewards_per_func.unsqueeze(1)
    if weights is None:
        weights = torch.ones(rewards_per_func.shape[1])
    w = torch.as_tensor(weights, dtype=torch.float32)
    w = w.to(rewards_per_func.device, rewards_per_func.dtype)
    total = (rewards_per_func * w).nansum(dim=1)
    all_missing = torch.isnan(rewards_per_func).all(dim=1)
    return total.masked_fill(all_missing, float("nan"))


@dataclass(frozen=True)
class GroupAdvantages:
    """Advantages and the group statistics TRL logs."""

    advantages: torch.Tensor  # [N]; 0 for skipped (NaN-reward) samples
    group_mean: torch.Tensor  # [N], each sample's group mean reward
    group_std: torch.Tensor  # [N], each sample's group std (unbiased, as torch.std)
    zero_std: torch.Tensor  # [N] bool: the sample's group has (near) zero reward std -> no signal
    valid: torch.Tensor  # [N] bool: the sample has a reward (not None/NaN)

    @property
    def frac_reward_zero_std(self) -> float:
        """Fraction of samples whose group has zero reward std (TRL's ``frac_reward_zero_std``)."""
        return self.zero_std.float().mean().item()

    @property
    def reward_std(self) -> float:
        """Mean group std (TRL's ``reward_std``)."""
        return self.group_std.nan_to_num(0.0).mean().item()

    def keep_mask(self, filter_zero_std: bool = True) -> torch.Tensor:
        """[N] bool: samples that take part in the loss (valid and, if filtering, non-zero-std)."""
        return self.valid & ~self.zero_std if filter_zero_std else self.valid


def group_advantages(rewards: torch.Tensor, group_size: int,
                     scale_rewards: ScaleRewards = "group") -> GroupAdvantages:
    """TRL's group-relative advantages: ``r - mean(group)``, divided by ``std + 1e-4`` of the group
    (``"group"``), of the whole batch (``"batch"``) or not at all (``"none"``).

    NaN rewards (unparseable gold, a reward that returned None) are left out of the group's
    statistics and get advantage 0 and ``valid=False``. ``zero_std`` is always the *group*'s std
    (a group with < 2 valid rewards counts as zero-std): those groups carry no learning signal.
    """
    check_choice("scale_rewards", scale_rewards, SCALE_REWARDS)
    if group_size < 1 or rewards.dim() != 1 or rewards.numel() % group_size:
        raise ConfigError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    rewards = rewards.float()
    valid = ~torch.isnan(rewards)
    mean, std = _masked_mean_std(rewards.view(-1, group_size), valid.view(-1, group_size))
    group_mean = mean.repeat_interleave(group_size)
    group_std = std.repeat_interleave(group_size)
    zero_std = torch.isclose(group_std.nan_to_num(0.0), torch.zeros_like(group_std))
    centred = torch.where(valid, rewards - group_mean, torch.zeros_like(rewards))
    if scale_rewards == "group":
        advantages = centred / (group_std.nan_to_num(0.0) + STD_EPS)
    elif scale_rewards == "batch":
        _, batch_std = _masked_mean_std(rewards.view(1, -1), valid.view(1, -1))
        advantages = centred / (batch_std.nan_to_num(0.0) + STD_EPS)
    else:
        advantages = centred
    return GroupAdvantages(advantages, group_mean, group_std, zero_std, valid)


def _masked_mean_std(values: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise mean and unbiased std over ``mask``ed entries ([G, n] -> [G]); std NaN if < 2."""
    count = mask.sum(dim=1)
    filled = torch.where(mask, values, torch.zeros_like(values))
    mean = filled.sum(dim=1) / count.clamp(min=1)
    sq = torch.where(mask, (values - mean.unsqueeze(1)) ** 2, torch.zeros_like(values)).sum(dim=1)
    std = (sq / (count - 1).clamp(min=1)).sqrt()
    std = torch.where(count >= 2, std, torch.full_like(std, float("nan")))
    return torch.where(count >= 1, mean, torch.zeros_like(mean)), std


# --------------------------------------------------------------------------- the loss mask


def loss_mask(lengths: Sequence[int], width: int, starts: Sequence[int] | None = None,
              truncated: Sequence[bool] | None = None) -> torch.Tensor:
    """[n, width] float mask of the completion tokens that enter the loss: tokens [starts[i],
    lengths[i]) of row i (`starts`: the rows' `loss_mask_prefix`, default 0), and none of a row
    that is `truncated` (TRL's ``mask_truncated_completions``: a completion cut at the length limit
    is not trained on; pass None to keep them). Built once per batch; the loss weights
    (:func:`batch_loss_weights`) are zero wherever it is."""
    positions = torch.arange(width)[None]
    mask = positions < torch.tensor(lengths, dtype=torch.long).reshape(-1, 1)
    if starts is not None:
        mask &= positions >= torch.tensor(starts, dtype=torch.long).reshape(-1, 1)
    if truncated is not None:
        mask &= ~torch.tensor(truncated, dtype=torch.bool).reshape(-1, 1)
    return mask.float()


# --------------------------------------------------------------------------- loss


def loss_normalizer(mask: torch.Tensor, loss_type: LossType = "grpo",
                    max_completion_length: int | None = None, num_sequences: int | None = None,
                    num_items_in_batch: float | None = None) -> torch.Tensor:
    """Per-token weights [N, T] (0 where masked) such that ``sum(weight * per_token_loss)`` is TRL's loss:

    * ``grpo``: mean over each sequence's tokens, then mean over sequences -> ``1 / (N * n_i)``;
    * ``dapo``: token-level mean over all tokens -> ``1 / num_items_in_batch`` (default: this
      mask's token count; pass the global count across micro-batches/processes);
    * ``bnpo``: token-level mean over this mask's tokens, TRL's per-micro-batch normalisation
      (:func:`batch_loss_weights` applies it to each micro-batch of a bigger batch);
    * ``dr_grpo``: ``1 / (N * max_completion_length)`` (default ``max_completion_length = T``).

    ``num_sequences`` overrides N: the global batch size when this mask is one micro-batch, or
    the number of kept sequences after zero-std filtering (TRL counts masked rows in N).
    Compute the weights once from the full mask, then slice them per segment.
    """
    check_choice("loss_type", loss_type, LOSS_TYPES)
    mask = mask.float()
    n = num_sequences if num_sequences is not None else mask.shape[0]
    if loss_type == "grpo":
        per_seq = mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        return mask / (per_seq * n)
    if loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else mask.shape[1]
        return mask / (n * length)
    if loss_type == "bnpo" and num_items_in_batch is not None:
        raise ConfigError("bnpo normalises by its own micro-batch's token count; num_items_in_batch is "
                          "dapo's")
    total = num_items_in_batch if num_items_in_batch is not None else mask.sum().item()
    return mask / max(float(total), 1.0)


def batch_loss_weights(mask: torch.Tensor, counted: torch.Tensor, loss_type: LossType = "grpo",
                       max_completion_length: int | None = None, processes: int = 1,
                       micro_batches: list[tuple[int, int]] | None = None) -> torch.Tensor:
    """Per-token weights [N, T] of a whole batch (every process's rows, in process order) such that
    summing ``weight * per_token_loss`` over all rows is TRL's loss: N, the token counts and every
    micro-batch count only the ``counted`` rows [N] bool (others get weight 0).

    ``grpo``, ``dr_grpo`` and ``dapo`` normalise by the whole batch (TRL: global token count for
    ``dapo``; a mean over equal micro-batches and processes for the others). ``bnpo`` normalises
    each micro-batch by its own token count, then by the number of micro-batches (TRL's gradient
    accumulation) and of processes (DDP's average): ``micro_batches`` are the [start, end) row
    spans of one process's rows (default: all of them, one micro-batch).
    """
    mask = mask.float() * counted.to(mask.device).unsqueeze(1)
    if loss_type != "bnpo":
        kept = max(int(counted.sum()), 1)
        return loss_normalizer(mask, loss_type, max_completion_length, num_sequences=kept)
    local = mask.shape[0] // processes
    spans = micro_batches if micro_batches is not None else [(0, local)]
    weights = torch.zeros_like(mask)
    for p in range(processes):
        for a, b in spans:
            rows = slice(p * local + a, p * local + b)
            weights[rows] = loss_normalizer(mask[rows], "bnpo") / (len(spans) * processes)
    return weights


@dataclass
class LossStats:
    """Additive token counts behind TRL's clip and KL metrics; sum them over segments/micro-batches."""

    tokens: float = 0.0
    low_clipped: float = 0.0
    high_clipped: float = 0.0
    region_clipped: float = 0.0
    kl_sum: float = 0.0
    has_kl: bool = False

    def __add__(self, other: LossStats) -> LossStats:
        return LossStats(self.tokens + other.tokens, self.low_clipped + other.low_clipped,
                         self.high_clipped + other.high_clipped, self.region_clipped + other.region_clipped,
                         self.kl_sum + other.kl_sum, self.has_kl or other.has_kl)

    def metrics(self) -> dict[str, float]:
        """TRL's names: ``clip_ratio/low_mean``, ``clip_ratio/high_mean``, ``clip_ratio/region_mean``,
        ``kl`` (only with a reference); token-level means over the masked tokens."""
        denom = max(self.tokens, 1.0)
        out = {
            "clip_ratio/low_mean": self.low_clipped / denom,
            "clip_ratio/high_mean": self.high_clipped / denom,
            "clip_ratio/region_mean": self.region_clipped / denom,
        }
        if self.has_kl:
            out["kl"] = self.kl_sum / denom
        return out


def token_loss_terms(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, advantages: torch.Tensor,
                     weights: torch.Tensor, mask: torch.Tensor | None = None, epsilon_low: float = 0.2,
                     epsilon_high: float = 0.2, beta: float = 0.0,
                     ref_logprobs: torch.Tensor | None = None) -> tuple[torch.Tensor, LossStats]:
    """Per-token loss terms ``weights * per_token_loss`` [N, t] for a slice of t tokens, and the
    additive stats of that slice. TRL's per-token loss:
    ``-min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A) + beta * KL``, ``r = exp(logp - old)``
    (``old`` = detached ``logp`` when None, i.e. one iteration per batch), k3 estimator
    ``KL = exp(ref - logp) - (ref - logp) - 1``. ``mask`` (default ``weights > 0``, the loss mask)
    decides which tokens count in the stats.
    """
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    mask = (weights > 0) if mask is None else mask.bool()
    adv = advantages.to(logprobs.dtype).unsqueeze(1)
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * adv, clipped * adv)
    stats = _clip_stats(ratio.detach(), adv.detach(), mask, epsilon_low, epsilon_high)
    if beta != 0.0:
        if ref_logprobs is None:
            raise ConfigError("beta != 0 needs ref_logprobs")
        kl = _k3_kl(logprobs, ref_logprobs)
        per_token = per_token + beta * kl
        stats.kl_sum, stats.has_kl = (kl.detach() * mask).sum().item(), True
    elif ref_logprobs is not None:  # log the KL even when it is not in the loss
        stats.kl_sum, stats.has_kl = (_k3_kl(logprobs.detach(), ref_logprobs) * mask).sum().item(), True
    return per_token * weights.to(per_token.dtype), stats


def _k3_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(pi || ref), per token, always >= 0."""
    diff = ref_logprobs - logprobs
    return torch.exp(diff) - diff - 1


def _clip_stats(ratio: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor, epsilon_low: float,
                epsilon_high: float) -> LossStats:
    """TRL's clip counts: low = r < 1 - eps_low with A < 0; high = r > 1 + eps_high with A > 0
    (exactly the tokens whose gradient the clip removes)."""
    low = (ratio < 1 - epsilon_low) & (adv < 0) & mask
    high = (ratio > 1 + epsilon_high) & (adv > 0) & mask
    return LossStats(tokens=mask.sum().item(), low_clipped=low.sum().item(), high_clipped=high.sum().item(),
                     region_clipped=(low | high).sum().item())


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor | None, advantages: torch.Tensor,
              mask: torch.Tensor, loss_type: LossType = "grpo", epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, beta: float = 0.0, ref_logprobs: torch.Tensor | None = None,
              max_completion_length: int | None = None, num_sequences: int | None = None,
              num_items_in_batch: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss of a full batch (``[N, T]`` log-probs, ``[N]`` advantages) and TRL's metrics.
    Equal to the sum of :func:`token_loss_terms` over any split of the tokens into segments."""
    weights = loss_normalizer(mask, loss_type, max_completion_length, num_sequences, num_items_in_batch)
    terms, stats = token_loss_terms(logprobs, old_logprobs, advantages, weights, mask, epsilon_low,
                                    epsilon_high, beta, ref_logprobs)
    return terms.sum(), stats.metrics()
