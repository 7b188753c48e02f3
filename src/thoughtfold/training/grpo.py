"""`GRPOTrainer`: cache-aware GRPO, called as TRL's (`GRPOTrainer(model, reward_funcs, args,
train_dataset)`).

One step: draw `prompts_per_step` prompts, sample `num_generations` completions of each under the
bounded cache, score them, compute group-normalised advantages, then update the adapter with the
clipped policy-gradient loss. The loss is built per replay segment with batch-wide token weights
(losses.py), so the summed segment (and micro-batch) losses equal the full-batch loss while backward
never spans more than one segment: memory is bounded by the cache window, not by the completion
length.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..checks import is_token_ids
from ..config import TrainConfig
from ..engine.adapter import adapters_disabled
from ..engine.rollout import right_pad
from ..errors import ConfigError, DataError
from ..messages import assistant_turn, is_conversation, text_of
from ..policy import GenerationResult, Policy
from ..tasks.rewards import check_reward_columns, load_reward, score_completions
from .distributed import row_spans
from .loop import TRAINER_ARGUMENTS, Trainer
from .losses import (
    GroupAdvantages,
    LossStats,
    batch_loss_weights,
    combine_rewards,
    group_advantages,
    loss_mask,
    token_loss_terms,
)

log = logging.getLogger("thoughtfold")

RewardFunc = Callable | str
LOSS_MASK_PREFIX = "loss_mask_prefix"


def loss_mask_prefix(example: dict) -> int:
    """How many leading completion tokens of this row's rollouts stay out of the GRPO loss: the
    dataset column `loss_mask_prefix` (0 when absent). For a free choice the reward must not shape,
    such as the recall task's early value: training it would let the policy collapse the choice."""
    value = example.get(LOSS_MASK_PREFIX, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"dataset column {LOSS_MASK_PREFIX} must be a whole number >= 0, got {value!r}")
    return value


@dataclass
class RolloutStats:
    """A step's rollouts as the advantages and the loss weights see them, row by row: each process's
    own (gathered from all of them), or all processes' joined in process order."""

    scores: torch.Tensor  # [rows, reward functions]
    lengths: list[int]
    truncated: list[bool]
    prefixes: list[int]  # leading completion tokens kept out of the loss (`loss_mask_prefix`)
    evictions: list[int]
    tokens_per_s: float

    @classmethod
    def join(cls, parts: Sequence[RolloutStats]) -> RolloutStats:
        return cls(torch.cat([p.scores for p in parts]), [n for p in parts for n in p.lengths],
                   [t for p in parts for t in p.truncated], [k for p in parts for k in p.prefixes],
                   [e for p in parts for e in p.evictions], sum(p.tokens_per_s for p in parts))


@dataclass
class PolicyBatch:
    """The rollouts that take part in an update, as padded tensors [n, T] with batch-wide loss
    weights (zero outside the loss mask); slicing rows gives replay micro-batches whose summed
    losses equal the batch loss."""

    prompt_ids: list[list[int]]
    completions: list[list[int]]
    logs: list[list]
    old: torch.Tensor
    advantages: torch.Tensor
    weights: torch.Tensor
    ref: torch.Tensor | None = None

    def rows(self, start: int, end: int) -> PolicyBatch:
        return PolicyBatch(self.prompt_ids[start:end], self.completions[start:end], self.logs[start:end],
                           self.old[start:end], self.advantages[start:end], self.weights[start:end],
                           None if self.ref is None else self.ref[start:end])

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def width(self) -> int:
        """Padded completion length (in lockstep: the longest over all processes)."""
        return self.old.shape[1]

    @property
    def prompt_tokens(self) -> int:
        """The longest prompt's length."""
        return max(map(len, self.prompt_ids), default=0)


class GRPOTrainer(Trainer):
    """Cache-aware GRPO: rollouts under the bounded cache, updates through the segment-wise replay.
    Called as TRL's: `GRPOTrainer(model, reward_funcs, args, train_dataset, eval_dataset,
    processing_class, callbacks=..., peft_config=...)`.
    `reward_funcs`: functions with TRL's reward signature (`fn(prompts, completions, completion_ids,
    **columns)`, completions as messages when the prompts are), or names / dotted paths that
    `rewards.load_reward` knows; else `args.rewards`. The dataset must hold the columns the rewards
    read (checked before the model loads)."""

    kind = "grpo"
    plot_key = "reward"

    def __init__(self, model: Policy | str | None = None,
                 reward_funcs: RewardFunc | Sequence[RewardFunc] | None = None,
                 args: TrainConfig | None = None, train_dataset: Iterable[dict] | None = None,
                 eval_dataset: Iterable[dict] | None = None, processing_class: Any = None,
                 callbacks: Iterable[Any] | None = None, peft_config: Any = None):
        config = args if args is not None else TrainConfig()
        if reward_funcs is None:
            reward_funcs = config.rewards
        elif callable(reward_funcs) or isinstance(reward_funcs, str):
            reward_funcs = [reward_funcs]
        if not reward_funcs:
            raise ConfigError("no rewards: pass reward_funcs or set rewards (e.g. arith, math, format)")
        # unknown names fail here, before the model loads
        self.reward_funcs = [load_reward(s) for s in reward_funcs]
        self.reward_names = [getattr(f, "__name__", str(i)) for i, f in enumerate(self.reward_funcs)]
        if config.reward_weights is not None and len(config.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"{len(config.reward_weights)} reward_weights for {len(self.reward_funcs)} "
                              "rewards")
        super().__init__(model, config, train_dataset, eval_dataset, processing_class, callbacks, peft_config)

    def _rows(self, dataset: Iterable[dict], name: str) -> list[dict]:
        rows = super()._rows(dataset, name)
        for reward, fn in zip(self.reward_names, self.reward_funcs, strict=True):
            check_reward_columns(reward, fn, rows, name)
        return rows

    def _load_dataset(self, dataset: Iterable[dict] | None) -> list[dict]:
        rows = super()._load_dataset(dataset)
        if dataset is None:  # a named dataset (given rows were checked by _rows)
            for reward, fn in zip(self.reward_names, self.reward_funcs, strict=True):
                check_reward_columns(reward, fn, rows, f"dataset {self.config.data.dataset!r}")
        return rows

    @property
    def updates_per_step(self) -> int:
        return self.config.num_iterations

    def train_step(self, examples: list[dict]) -> dict[str, float]:
        """Rollouts -> rewards -> advantages -> `num_iterations` clipped policy-gradient updates.
        Rewards and completion statistics are gathered from every process, so advantages, zero-std
        filtering, loss weights and metrics are those of the global batch."""
        c = self.config
        prompts = [e["prompt"] for e in examples for _ in range(c.num_generations)]
        prefixes = [loss_mask_prefix(e) for e in examples for _ in range(c.num_generations)]
        rollout = self.generate(prompts)
        mine = RolloutStats(self._score(examples, prompts, rollout), [len(x) for x in rollout.completion_ids],
                            rollout.truncated, prefixes, rollout.evictions, rollout.stats["tokens_per_s"])
        stats = RolloutStats.join(self.dp.gather(mine))
        rewards = combine_rewards(stats.scores, c.reward_weights)
        adv = group_advantages(rewards, c.num_generations, c.scale_rewards)
        weights, keep = self._loss_weights(stats, adv, len(prompts))
        local = self.dp.local_rows(len(prompts))
        if c.log_completions:
            self.last_completions = self._completion_rows(prompts, rollout, rewards[local],
                                                          adv.advantages[local])
        rows = keep[local].nonzero()[:, 0].tolist()
        batch = self._policy_batch(rollout, adv.advantages[local], rows, weights[local])
        return {**self._rollout_metrics(stats, rewards, adv), **self._update(batch)}

    def generate(self, prompts: list, purpose: str = "rollout") -> GenerationResult:
        """Sample under the bounded cache in one call, `generation_batch_size` slots decoding at once
        (None: every row) with continuous batching: a finished sequence's slot takes the next row.
        Each row samples from its own stream, a function of (purpose, seed, step, process, row), so a
        resumed run samples exactly what it would have, whatever the number of slots."""
        c = self.config
        rng = random.Random(f"{purpose}:{c.seed}:{self.step}:{self.dp.rank}")
        return self.policy.generate(prompts, **c.sampling(rng.randrange(2**31)).to_dict(),
                                    chat_template=c.data.chat_template, system_prompt=c.data.system_prompt,
                                    slots=c.generation_batch_size)

    def _score(self, examples: list[dict], prompts: list[str], rollout: GenerationResult) -> torch.Tensor:
        """[n, F] scores of each reward function (TRL's call: prompts, completions, completion_ids and
        the dataset columns as keywords); None scores become NaN and are skipped downstream."""
        per_func = []
        # as TRL: completions in the conversational form when the prompts are conversations
        completions = [assistant_turn(t) if is_conversation(p) else t for p, t in zip(prompts, rollout.texts,
                                                                                       strict=True)]
        for name, fn in zip(self.reward_names, self.reward_funcs, strict=True):
            scores = score_completions(name, fn, prompts, completions, rollout.completion_ids, examples,
                                       repeat=self.config.num_generations, timeout=self.config.reward_timeout)
            if all(s is None for s in scores):
                log.warning("step %d: reward %s scored none of the %d completions (all None or NaN), so it "
                            "is left out of this step; check the dataset columns it reads", self.step + 1,
                            name, len(scores))
            per_func.append(torch.tensor([math.nan if s is None else s for s in scores]))
        return torch.stack(per_func, 1)

    def _completion_rows(self, prompts: list, rollout: GenerationResult, rewards: torch.Tensor,
                         advantages: torch.Tensor) -> list[dict]:
        """This process's completions of the step as log_completions shows and saves them (a token-id
        prompt decoded, a conversation's last user turn)."""
        tokenizer = self.policy.tokenizer
        shown = [tokenizer.decode(p) if tokenizer is not None and is_token_ids(p) else text_of(p)
                 for p in prompts]
        return [{"prompt": p, "completion": t, "reward": float(r), "advantage": float(a), "length": len(ids),
                 "evictions": e}
                for p, t, r, a, ids, e in zip(shown, rollout.texts, rewards.tolist(), advantages.tolist(),
                                              rollout.completion_ids, rollout.evictions, strict=True)]

    def evaluate(self) -> dict[str, float]:
        """`num_generations` completions of each eval_dataset prompt, sampled under the cache as
        rollouts are (seeds fixed by the step), scored by the rewards: eval_reward (the weighted sum's
        mean), eval_rewards/<name>/mean, eval_completions/mean_length, eval_evictions_per_rollout."""
        if self.eval_dataset is None:
            raise ConfigError("evaluate() needs an eval_dataset: pass one to the trainer")
        c, rows = self.config, self.eval_dataset
        prompts = [e["prompt"] for e in rows for _ in range(c.num_generations)]
        rollout = self.generate(prompts, purpose="eval")
        scores = self._score(rows, prompts, rollout)
        metrics = {f"eval_rewards/{name}/mean": scores[:, j].nanmean().nan_to_num(0.0).item()
                   for j, name in enumerate(self.reward_names)}
        lengths = [len(x) for x in rollout.completion_ids]
        return {"eval_reward": combine_rewards(scores, c.reward_weights).nanmean().nan_to_num(0.0).item(),
                **metrics, "eval_completions/mean_length": sum(lengths) / len(lengths),
                "eval_evictions_per_rollout": sum(rollout.evictions) / len(lengths)}

    def _loss_weights(self, stats: RolloutStats, adv: GroupAdvantages,
                      local_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The global batch's per-token loss weights [N, T] (from its loss mask, built once here)
        and the rows that are replayed [N] (valid rewards; with `filter_zero_std`, not in a
        zero-std group)."""
        c = self.config
        keep = adv.keep_mask(c.filter_zero_std)
        mask = loss_mask(stats.lengths, max(stats.lengths), stats.prefixes,
                         stats.truncated if c.mask_truncated_completions else None)
        counted = keep if c.zero_std_norm == "kept" else adv.valid
        weights = batch_loss_weights(mask, counted, c.loss_type, c.max_completion_length, self.dp.world,
                                     row_spans(local_rows, c.replay_batch_size))
        return weights, keep

    def _rollout_metrics(self, stats: RolloutStats, rewards: torch.Tensor,
                         adv: GroupAdvantages) -> dict[str, float]:
        """TRL's reward and completion metrics of the global batch, plus the cache's."""
        # NaN, not 0, where nothing was scored: a reward that never scores must show in the log
        metrics = {f"rewards/{name}/mean": stats.scores[:, j].nanmean().item()
                   for j, name in enumerate(self.reward_names)}
        n = len(stats.lengths)
        return {
            **metrics,
            "reward": rewards.nanmean().item(),
            "reward_std": adv.reward_std,
            "frac_reward_zero_std": adv.frac_reward_zero_std,
            "rewards/skipped": int(torch.isnan(rewards).sum()),
            "completions/mean_length": sum(stats.lengths) / n,
            "completions/min_length": min(stats.lengths),
            "completions/max_length": max(stats.lengths),
            "completions/clipped_ratio": sum(stats.truncated) / n,
            "evictions_per_rollout": sum(stats.evictions) / n,
            "rollout_tokens_per_s": stats.tokens_per_s,
        }

    def _policy_batch(self, rollout: GenerationResult, advantages: torch.Tensor, rows: list[int],
                      weights: torch.Tensor) -> PolicyBatch:
        """This process's kept `rows` with their advantages and loss `weights` (this process's rows
        of :func:`batch_loss_weights`); old log-probs are the rollout's."""
        device = self.policy.device
        completions = [rollout.completion_ids[i] for i in rows]
        width = self.replays.width(completions)
        old = right_pad([rollout.logprobs[i] for i in rows], width, dtype=torch.float32)
        batch = PolicyBatch([rollout.prompt_ids[i] for i in rows], completions,
                            [rollout.eviction_log[i] for i in rows], old.to(device),
                            advantages[rows].to(device), weights[rows, :width].to(device))
        if self.config.beta != 0 and self.replays.runs(len(rows)):
            batch.ref = self._reference_logprobs(batch)
        return batch

    def _reference_logprobs(self, batch: PolicyBatch) -> torch.Tensor:
        """Log-probs under the adapter-disabled model and the same cache: the KL reference."""
        ref: list[torch.Tensor] = []
        with torch.no_grad(), adapters_disabled(self.policy.wrappers):
            for a, b in self.replays.spans(len(batch), batch.width, False, batch.prompt_tokens):
                part = batch.rows(a, b)
                ref += self.replays.replay(part.prompt_ids, part.completions, part.logs, batch.width,
                                           temperature=self.config.temperature)
        return right_pad(ref, batch.width, dtype=torch.float32).to(self.policy.device)

    def _update(self, batch: PolicyBatch) -> dict[str, float]:
        """`num_iterations` optimizer updates, each accumulating gradients over replay micro-batches
        (at most `replay_batch_size` rows, as many as `replay_memory_gb` holds) and segments; an empty
        batch (all groups filtered) steps nothing."""
        stats, loss, norms = LossStats(), 0.0, []
        for _ in range(self.config.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for a, b in self.replays.spans(len(batch), batch.width, True, batch.prompt_tokens):
                part_loss, part_stats = self._replay_loss(batch.rows(a, b))
                loss, stats = loss + part_loss, stats + part_stats
            norms.append(self.optimizer_step())
        n = self.config.num_iterations
        loss, *counts = self.dp.sum([loss, stats.tokens, stats.low_clipped, stats.high_clipped,
                                     stats.region_clipped, stats.kl_sum])
        stats = LossStats(*counts, has_kl=stats.has_kl or self.config.beta != 0)
        return {"loss": loss / n, "grad_norm": sum(norms) / n, **stats.metrics()}

    def _replay_loss(self, batch: PolicyBatch) -> tuple[float, LossStats]:
        """Backward of the GRPO loss of `batch`, segment by segment; returns its value and stats."""
        c = self.config
        stats, loss = LossStats(), 0.0

        def loss_fn(lp: torch.Tensor, start: int, end: int, rows: list[int]) -> torch.Tensor:
            nonlocal stats, loss
            terms, seg = token_loss_terms(
                lp, batch.old[rows, start:end], batch.advantages[rows], batch.weights[rows, start:end],
                epsilon_low=c.epsilon, epsilon_high=c.epsilon_high, beta=c.beta,
                ref_logprobs=None if batch.ref is None else batch.ref[rows, start:end])
            total = terms.sum()
            stats, loss = stats + seg, loss + total.item()
            return total

        self.replays.replay(batch.prompt_ids, batch.completions, batch.logs, batch.width, loss_fn=loss_fn,
                            temperature=c.temperature)
        self.record_replayed_state()
        return loss, stats


GRPOTrainer.__doc__ += TRAINER_ARGUMENTS  # help() shows what the constructor takes

__all__ = ["GRPOTrainer", "PolicyBatch", "RolloutStats", "loss_mask_prefix"]
