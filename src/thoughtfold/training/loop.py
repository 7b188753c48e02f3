"""Training loops through the segment-wise replay: cache-aware GRPO and supervised fine-tuning.

One GRPO step: draw `prompts_per_step` prompts, sample `num_generations` completions of each under the
bounded cache, score them, compute group-normalised advantages, then update the adapter with the
clipped policy-gradient loss. The loss is built per replay segment with batch-wide token weights
(grpo.py), so the summed segment (and micro-batch) losses equal the full-batch loss while backward
never spans more than one segment: memory is bounded by the cache window, not by the completion
length. Under `torchrun` each process takes its share of the prompts; with `fsdp` the frozen base
weights are sharded too (parallel.py).

The settings are a `TrainConfig` (config.py); each step's metrics go to metrics.py's log.
Checkpoints (checkpoint.py) make a run resumable exactly, even after a SIGKILL.
"""

from __future__ import annotations

import logging
import math
import random
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..config import CacheConfig, TrainConfig, config_to_yaml
from ..engine.adapter import adapters_disabled
from ..engine.eviction import OldestBlock
from ..errors import ConfigError, DataError
from ..evaluation.report import plot_curves
from ..persist import lock_directory
from ..policy import GenerationResult, Policy, concat_rollouts
from ..tasks.data import load_dataset_by_name
from ..tasks.rewards import load_reward, score_completions
from .checkpoint import (
    ADAPTER_DIR,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from .distributed import DataParallel, shard_base_model
from .losses import (
    LossStats,
    batch_loss_weights,
    combine_rewards,
    group_advantages,
    mask_truncated_completions,
    token_loss_terms,
)
from .metrics import METRICS_NAME, MetricsLogger, mean_metrics, peak_memory_gb, read_metrics

log = logging.getLogger("thoughtfold")

CHECKPOINTS_DIR = "checkpoints"


# --------------------------------------------------------------------------- shared loop


class _Trainer:
    """The parts GRPO and SFT share: model, data order, optimizer and schedule, checkpoints, logs.
    Arguments as TRL's trainers take them: `model` is a `Policy`, trained as it is (its cache and
    adapter settings win over `args`'), or a model id / path loaded with `args`' cache and adapter
    settings, or None for `args.model`; `args` is the TrainConfig (default: the quickstart run); a
    given `train_dataset` (rows with a "prompt" and the reward's columns) replaces `args.data`."""

    kind = "train"
    plot_key = "loss"

    def __init__(self, model: Policy | str | None = None, args: TrainConfig | None = None,
                 train_dataset: Sequence[dict] | None = None):
        if model is not None and not isinstance(model, (Policy, str)):
            raise ConfigError(f"model must be a thoughtfold Policy, a model id or path, or None (args.model), "
                              f"got {type(model).__name__}")
        args = args if args is not None else TrainConfig()
        # a model named here is the run's model: the saved config.yaml must say so for a resume
        self.config = replace(args, model=model) if isinstance(model, str) else args
        config = self.config
        self.output_dir = Path(config.output_dir)
        self.dp = DataParallel()
        random.seed(config.seed)
        torch.manual_seed(config.seed)  # same adapter init on every process
        self.dataset = self._load_dataset(train_dataset)
        # one run per output_dir, until train() ends; taken before the model loads
        self._lock = lock_directory(self.output_dir, "training run") if self.dp.main else None
        self._check_output_dir()
        self.policy = model if isinstance(model, Policy) else self._load_policy()
        self.fsdp = config.fsdp and self.dp.world > 1
        if self.fsdp and type(self.policy.eviction_policy) not in (type(None), OldestBlock):
            raise ConfigError("fsdp replays the default oldest-block eviction schedule on every process (all must "
                              "run the same segments), but this policy has a custom eviction_policy: train without fsdp")
        if self.fsdp and self.policy.cache_config.eviction != "oldest":
            raise ConfigError(f"fsdp replays the default oldest-block eviction schedule on every process, but "
                              f"cache.eviction is {self.policy.cache_config.eviction}: train without fsdp or with "
                              "cache.eviction=oldest")
        if self.fsdp:
            shard_base_model(self.policy.model, self.policy.wrappers)
            # collectives run inside every forward: no graph capture, and every process stops together
            self.policy.cuda_graph = self.policy.compile_decode = False
            self.policy.lockstep = self.dp.all
        self.params = self.policy.trainable_parameters()
        if not self.params:
            raise ConfigError("adapter mode 'none' has nothing to train: set adapter.mode to lora or pte")
        self.optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, weight_decay=config.weight_decay)
        self.scheduler = self._make_scheduler()
        self.step = 0
        self.data_pos = 0
        self._orders: dict[int, list[int]] = {}
        self._saved_step = -1
        if config.resume:
            self._resume()
        self.output_dir.mkdir(parents=True, exist_ok=True)

    # ---- setup

    def _load_dataset(self, dataset: Sequence[dict] | None) -> list[dict]:
        d = self.config.data
        rows = list(dataset) if dataset is not None else load_dataset_by_name(
            d.dataset, d.split, d.limit, d.prompt_field, d.answer_field)
        if not rows:
            raise DataError(f"dataset {d.dataset!r} has no examples")
        return rows

    def _load_policy(self) -> Policy:
        c = self.config
        device = c.device
        if device is None and self.dp.world > 1 and torch.cuda.is_available():
            device = f"cuda:{torch.cuda.current_device()}"  # one GPU per process
        return Policy.from_pretrained(c.model, cache=c.cache, adapter=c.adapter, dtype=c.dtype, device=device,
                                      compile_decode=c.compile_decode)

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """HF's schedules (warmup then constant / linear / cosine decay), one tick per optimizer update."""
        from transformers import get_scheduler

        c = self.config
        name = "constant_with_warmup" if c.lr_scheduler_type == "constant" else c.lr_scheduler_type
        updates = c.max_steps * self.updates_per_step
        return get_scheduler(name, self.optimizer, num_warmup_steps=c.warmup_steps * self.updates_per_step,
                             num_training_steps=updates)

    @property
    def updates_per_step(self) -> int:
        return 1

    def _check_output_dir(self) -> None:
        """Never mix a new run into an old one (checked before the model loads): refuse, or with
        `overwrite_output_dir` delete the old checkpoints so a later resume cannot pick them up."""
        c, checkpoints = self.config, self.output_dir / CHECKPOINTS_DIR
        if c.resume or not list_checkpoints(checkpoints):
            return
        if not c.overwrite_output_dir:
            raise ConfigError(f"{self.output_dir} already holds checkpoints: set resume=true to continue that run, "
                              "overwrite_output_dir=true to start over, or pick another output_dir")
        self.dp.barrier()  # every process has looked before the main one deletes
        if self.dp.main:
            log.info("overwrite_output_dir: removing the old checkpoints in %s", checkpoints)
            shutil.rmtree(checkpoints)

    def _resume(self) -> None:
        """Continue from the newest intact checkpoint (a fresh start if there is none yet). A corrupt
        one (a disk that filled up, a truncated copy) is skipped with a warning and renamed aside,
        so that checkpoint pruning and later resumes do not count it."""
        checkpoints = self.output_dir / CHECKPOINTS_DIR
        found = list_checkpoints(checkpoints)
        if not found:
            log.info("no checkpoint in %s: starting from step 0", checkpoints)
            return
        for path in reversed(found):
            try:
                self._restore(path)
            except ConfigError as e:
                log.warning("checkpoint %s is unusable, trying the one before: %s", path.name, e)
                if self.dp.main:
                    path.rename(path.with_name(path.name + ".corrupt"))
                continue
            log.info("resumed from %s (step %d)", path, self.step)
            return
        raise ConfigError(f"none of the {len(found)} checkpoints in {checkpoints} is intact (see the warnings); "
                          "start over with overwrite_output_dir=true or restore them from a copy")

    # ---- replays (under FSDP in lockstep: every process runs the same forward/backward passes)

    def _backprop_kwargs(self) -> dict[str, str]:
        """How gradients cross eviction events in the replay (config.backprop)."""
        return {"backprop": self.config.backprop}

    def lockstep_width(self, completions: Sequence[Sequence[int]]) -> int:
        """The width replays are padded to: the longest completion here, or over all processes
        under FSDP (then every process replays the same segments)."""
        width = max((len(c) for c in completions), default=0)
        return self.dp.max(width) if self.fsdp else width

    def replay_spans(self, n: int, width: int, train: bool) -> Iterator[tuple[int, int]]:
        """Micro-batches of `n` rows. Under FSDP a process that runs out of rows before the others
        then runs idle replays (`idle_replay`) until every process has replayed as many."""
        spans = list(_spans(n, self.config.replay_batch_size))
        idle = self.dp.max(len(spans)) - len(spans) if self.fsdp else 0  # a collective: before any replay
        yield from spans
        for _ in range(idle):
            self.idle_replay(width, train)

    def replay_args(self, logs: list, width: int) -> dict:
        """Eviction logs as recorded, or under FSDP the default schedule padded to `width`: the same
        segments on every process, and the recorded logs themselves (FSDP refuses custom eviction
        policies)."""
        return {"eviction_log": None, "min_length": width} if self.fsdp else {"eviction_log": logs}

    def idle_replay(self, width: int, train: bool) -> None:
        """Under FSDP, what a process with no rows left runs while the others replay: one padding
        sequence of `width` tokens with a zero loss, so its collectives match theirs."""
        pad = self.policy.pad_token_id
        kwargs = {"loss_fn": lambda lp, a, b, rows: lp.sum() * 0.0, **self._backprop_kwargs()} if train else {}
        self.policy.replay_logprobs([[pad]], [[pad] * max(width, 1)], None, min_length=width, **kwargs)

    # ---- data

    def next_examples(self, n: int) -> list[dict]:
        """The next `n` rows of the (per-epoch reshuffled) dataset; a pure function of data_pos."""
        out = []
        for _ in range(n):
            epoch, i = divmod(self.data_pos, len(self.dataset))
            out.append(self.dataset[self._order(epoch)[i]])
            self.data_pos += 1
        return out

    def local_examples(self) -> list[dict]:
        """This process's `prompts_per_step` rows of the next global batch (all processes advance
        through the same order, so the global batch is what one process would have drawn)."""
        n = self.config.prompts_per_step
        return self.next_examples(n * self.dp.world)[self.dp.rank * n : (self.dp.rank + 1) * n]

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.dataset)))
            if self.config.data.shuffle:
                random.Random(f"{self.config.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    # ---- optimisation

    def optimizer_step(self) -> float:
        """Clip, step, tick the schedule; returns the pre-clip gradient norm."""
        self.dp.sum_gradients(self.params)
        limit = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, limit)
        self.optimizer.step()
        self.scheduler.step()
        return float(norm)

    def train_step(self, examples: list[dict]) -> dict[str, float]:
        raise NotImplementedError

    # ---- checkpoints

    def save_checkpoint(self) -> Path:
        """Adapter + optimizer + schedule + RNG + data position, atomically (by the main process;
        the others wait, so no process runs ahead of the last complete checkpoint)."""
        path = self.output_dir / CHECKPOINTS_DIR / checkpoint_name(self.step)
        if self.dp.main:
            self._write_checkpoint()
        self.dp.barrier()
        self._saved_step = self.step
        return path

    def _write_checkpoint(self) -> None:
        state = {
            "step": self.step,
            "data_pos": self.data_pos,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
        }
        save_checkpoint(self.output_dir / CHECKPOINTS_DIR, self.step, self.policy, state,
                        keep=self.config.save_total_limit)

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path, self.policy)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        self.step, self.data_pos = int(state["step"]), int(state["data_pos"])
        self._saved_step = self.step

    # ---- the loop

    def train(self) -> dict[str, Path | None]:
        """Run to `max_steps`, checkpointing every `save_steps` steps and at the end, logging every
        `logging_steps` steps (and at each checkpoint and the last step); returns the paths of the
        adapter, the metrics log and the plot. Releases the output directory's lock."""
        try:
            return self._train()
        finally:
            if self._lock is not None:
                self._lock.close()

    def _train(self) -> dict[str, Path | None]:
        c = self.config
        logger = None
        if self.dp.main:
            (self.output_dir / "config.yaml").write_text(config_to_yaml(c))
            logger = MetricsLogger(self.output_dir, c.report_to, self.step,
                                   asdict(c))
        bar = tqdm(total=c.max_steps, initial=self.step, disable=not (c.progress and self.dp.main),
                   desc=self.kind, unit="step", dynamic_ncols=True)
        unlogged: list[dict[str, float]] = []  # the steps since the last log line
        try:
            while self.step < c.max_steps:
                unlogged.append(self._timed_step())
                bar.update(1)
                checkpoint = bool(c.save_steps) and self.step % c.save_steps == 0
                # a checkpoint always logs: a resumed run then logs the same lines as an uninterrupted one
                if checkpoint or self.step % c.logging_steps == 0 or self.step == c.max_steps:
                    metrics, unlogged = mean_metrics(unlogged), []
                    if logger is not None:
                        logger.log(metrics)
                    bar.set_postfix(self._postfix(metrics), refresh=False)
                if checkpoint:
                    self.save_checkpoint()
        finally:
            bar.close()
            if logger is not None:
                logger.close()
        if self._saved_step != self.step:
            self.save_checkpoint()
        return self._finish()

    def _timed_step(self) -> dict[str, float]:
        device = self.policy.device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        lr = self.scheduler.get_last_lr()[0]
        start = time.perf_counter()
        metrics = self.train_step(self.local_examples())
        self.step += 1
        return {"step": self.step, "epoch": self.data_pos / len(self.dataset), "learning_rate": lr, **metrics,
                "peak_memory_gb": peak_memory_gb(device), "step_seconds": time.perf_counter() - start}

    def _postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"loss": f"{metrics.get('loss', 0.0):.4f}"}

    def _finish(self) -> dict[str, Path | None]:
        adapter = self.output_dir / ADAPTER_DIR
        metrics_path = self.output_dir / METRICS_NAME
        plot_path = self.output_dir / f"{self.plot_key}.png"
        if self.dp.main:
            self.policy.save_adapter(adapter)
            plot_path = plot_curves({self.kind: read_metrics(metrics_path)}, self.plot_key, plot_path,
                                    self.output_dir.name)
        self.dp.barrier()
        return {"adapter": adapter, "metrics": metrics_path, "plot": plot_path}


# --------------------------------------------------------------------------- GRPO


def _padded(rows: Sequence[Sequence[float]] | Sequence[torch.Tensor], width: int, device: torch.device) -> torch.Tensor:
    """Right-pad variable-length rows with zeros into a float tensor [len(rows), width]."""
    out = torch.zeros(len(rows), width, device=device)
    for i, row in enumerate(rows):
        values = torch.as_tensor(row, dtype=torch.float32)
        out[i, : len(values)] = values.to(device)
    return out


def _length_mask(lengths: Sequence[int], width: int, device: torch.device,
                 starts: Sequence[int] | None = None) -> torch.Tensor:
    """[n, width] float mask of the tokens [starts[i], lengths[i]) of each row (starts default 0)."""
    positions = torch.arange(width, device=device)[None]
    mask = positions < torch.tensor(lengths, device=device, dtype=torch.long).reshape(-1, 1)
    if starts is not None:
        mask &= positions >= torch.tensor(starts, device=device, dtype=torch.long).reshape(-1, 1)
    return mask.float()


LOSS_MASK_PREFIX = "loss_mask_prefix"


def loss_mask_prefix(example: dict) -> int:
    """How many leading completion tokens of this row's rollouts stay out of the GRPO loss: the
    dataset column `loss_mask_prefix` (0 when absent). For a free choice the reward must not shape,
    such as the recall task's early value: training it would let the policy collapse the choice."""
    value = example.get(LOSS_MASK_PREFIX, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise DataError(f"dataset column {LOSS_MASK_PREFIX} must be a whole number >= 0, got {value!r}")
    return value


def _spans(n: int, size: int | None) -> list[tuple[int, int]]:
    """[start, end) chunks of `size` rows covering n rows (one chunk when size is None)."""
    size = size or max(n, 1)
    return [(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass
class PolicyBatch:
    """The rollouts that take part in an update, as padded tensors [n, T] with batch-wide loss
    weights; slicing rows gives replay micro-batches whose summed losses equal the batch loss."""

    prompt_ids: list[list[int]]
    completions: list[list[int]]
    logs: list[list]
    old: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    weights: torch.Tensor
    ref: torch.Tensor | None = None

    def rows(self, start: int, end: int) -> PolicyBatch:
        return PolicyBatch(self.prompt_ids[start:end], self.completions[start:end], self.logs[start:end],
                           self.old[start:end], self.advantages[start:end], self.mask[start:end],
                           self.weights[start:end], None if self.ref is None else self.ref[start:end])

    def __len__(self) -> int:
        return len(self.completions)

    @property
    def width(self) -> int:
        """Padded completion length (under FSDP: the longest over all processes)."""
        return self.old.shape[1]


@dataclass
class RolloutShare:
    """What each process contributes to a GRPO step's global batch (gathered from all of them):
    the scores and the statistics of its rollouts, row by row."""

    scores: torch.Tensor  # [rows, reward functions]
    completion_ids: list[list[int]]
    truncated: list[bool]
    evictions: list[int]
    tokens_per_s: float
    loss_mask_prefix: list[int]  # leading completion tokens kept out of the loss (`loss_mask_prefix`)


RewardFunc = Callable | str


class GRPOTrainer(_Trainer):
    """Cache-aware GRPO: rollouts under the bounded cache, updates through the segment-wise replay.
    Called as TRL's: `GRPOTrainer(model, reward_funcs, args, train_dataset)`. The rewards are
    `reward_funcs` (functions, or names / dotted paths that `rewards.load_reward` knows) when given,
    else `args.rewards`."""

    kind = "grpo"
    plot_key = "reward"

    def __init__(self, model: Policy | str | None = None,
                 reward_funcs: RewardFunc | Sequence[RewardFunc] | None = None, args: TrainConfig | None = None,
                 train_dataset: Sequence[dict] | None = None):
        config = args if args is not None else TrainConfig()
        if reward_funcs is None:
            reward_funcs = config.rewards
        elif callable(reward_funcs) or isinstance(reward_funcs, str):
            reward_funcs = [reward_funcs]
        if not reward_funcs:
            raise ConfigError("no rewards: pass reward_funcs or set rewards (e.g. arith, math, format)")
        self.reward_funcs = [load_reward(s) for s in reward_funcs]  # unknown names fail before the model loads
        self.reward_names = [getattr(f, "__name__", str(i)) for i, f in enumerate(self.reward_funcs)]
        if config.reward_weights is not None and len(config.reward_weights) != len(self.reward_funcs):
            raise ConfigError(f"{len(config.reward_weights)} reward_weights for {len(self.reward_funcs)} rewards")
        super().__init__(model, config, train_dataset)

    @property
    def updates_per_step(self) -> int:
        return self.config.num_iterations

    def train_step(self, examples: list[dict]) -> dict[str, float]:
        """Rollouts -> rewards -> advantages -> `num_iterations` clipped policy-gradient updates.
        Rewards and completion statistics are gathered from every process, so advantages, zero-std
        filtering, loss weights and metrics are those of the global batch."""
        c, dp = self.config, self.dp
        prompts = [e["prompt"] for e in examples for _ in range(c.num_generations)]
        prefixes = [loss_mask_prefix(e) for e in examples for _ in range(c.num_generations)]
        rollout = self.generate(prompts)
        parts = dp.gather(RolloutShare(self._score(examples, prompts, rollout), rollout.completion_ids,
                                       rollout.truncated, rollout.evictions, rollout.stats["tokens_per_s"], prefixes))
        scores = torch.cat([p.scores for p in parts])
        lengths = [len(ids) for p in parts for ids in p.completion_ids]
        truncated = [t for p in parts for t in p.truncated]
        rewards = combine_rewards(scores, c.reward_weights)
        adv = group_advantages(rewards, c.num_generations, c.scale_rewards)
        metrics = {f"rewards/{name}/mean": scores[:, j].nanmean().nan_to_num(0.0).item()
                   for j, name in enumerate(self.reward_names)}
        metrics.update({
            "reward": rewards.nanmean().nan_to_num(0.0).item(),
            "reward_std": adv.reward_std,
            "frac_reward_zero_std": adv.frac_reward_zero_std,
            "rewards/skipped": int(torch.isnan(rewards).sum()),
            "completions/mean_length": sum(lengths) / len(lengths),
            "completions/min_length": min(lengths),
            "completions/max_length": max(lengths),
            "completions/clipped_ratio": sum(truncated) / len(lengths),
            "evictions_per_rollout": sum(e for p in parts for e in p.evictions) / len(lengths),
            "rollout_tokens_per_s": sum(p.tokens_per_s for p in parts),
        })
        keep = adv.keep_mask(c.filter_zero_std)
        starts = [k for p in parts for k in p.loss_mask_prefix]
        mask = mask_truncated_completions(_length_mask(lengths, max(lengths), torch.device("cpu"), starts=starts),
                                          torch.tensor(truncated), c.mask_truncated_completions)
        weights = batch_loss_weights(mask, keep if c.zero_std_norm == "kept" else adv.valid, c.loss_type,
                                     c.max_completion_length, dp.world, _spans(len(prompts), c.replay_batch_size))
        offset = dp.rank * len(prompts)
        mine = [i - offset for i in keep.nonzero()[:, 0].tolist() if offset <= i < offset + len(prompts)]
        local = slice(offset, offset + len(prompts))
        batch = self._policy_batch(rollout, adv.advantages[local], mine, weights[local], [prefixes[i] for i in mine])
        metrics.update(self._update(batch))
        return metrics

    def generate(self, prompts: list[str]) -> GenerationResult:
        """Sample under the bounded cache, `generation_batch_size` rows per call; the seeds are a
        function of (seed, step, process, chunk), so a resumed run samples exactly what it would have."""
        c = self.config
        rng = random.Random(f"rollout:{c.seed}:{self.step}:{self.dp.rank}")
        return concat_rollouts([
            self.policy.generate(
                prompts[a:b], max_new_tokens=c.max_completion_length, temperature=c.temperature, top_p=c.top_p,
                top_k=c.top_k, seed=rng.randrange(2**31), chat_template=c.data.chat_template,
                system_prompt=c.data.system_prompt)
            for a, b in _spans(len(prompts), c.generation_batch_size)
        ])

    def _score(self, examples: list[dict], prompts: list[str], rollout: GenerationResult) -> torch.Tensor:
        """[n, F] scores of each reward function (TRL's call: prompts, completions, completion_ids and
        the dataset columns as keywords); None scores become NaN and are skipped downstream."""
        per_func = []
        for name, fn in zip(self.reward_names, self.reward_funcs, strict=True):
            scores = score_completions(name, fn, prompts, rollout.texts, rollout.completion_ids, examples,
                                       repeat=self.config.num_generations)
            per_func.append(torch.tensor([math.nan if s is None else s for s in scores]))
        return torch.stack(per_func, 1)

    def _policy_batch(self, rollout: GenerationResult, advantages: torch.Tensor, rows: list[int],
                      weights: torch.Tensor, prefixes: list[int]) -> PolicyBatch:
        """This process's kept rows with their masks and loss weights (`weights`: this process's rows
        of :func:`batch_loss_weights`); old log-probs are the rollout's. The first `prefixes[j]`
        tokens of row j are left out of the loss (`loss_mask_prefix`)."""
        c, device = self.config, self.policy.device
        completions = [rollout.completion_ids[i] for i in rows]
        width = self.lockstep_width(completions)
        truncated = torch.tensor([rollout.truncated[i] for i in rows], dtype=torch.bool, device=device)
        mask = _length_mask([len(x) for x in completions], width, device, starts=prefixes)
        mask = mask_truncated_completions(mask, truncated, c.mask_truncated_completions)
        batch = PolicyBatch(
            [rollout.prompt_ids[i] for i in rows], completions, [rollout.eviction_log[i] for i in rows],
            _padded([rollout.logprobs[i] for i in rows], width, device), advantages[rows].to(device), mask,
            weights[rows, :width].to(device))
        if c.beta != 0 and (rows or self.fsdp):
            batch.ref = self._reference_logprobs(batch, width)
        return batch

    def _reference_logprobs(self, batch: PolicyBatch, width: int) -> torch.Tensor:
        """Log-probs under the adapter-disabled model and the same cache: the KL reference."""
        ref: list[torch.Tensor] = []
        with torch.no_grad(), adapters_disabled(self.policy.wrappers):
            for span in self.replay_spans(len(batch), width, train=False):
                part = batch.rows(*span)
                ref += self.policy.replay_logprobs(part.prompt_ids, part.completions,
                                                   temperature=self.config.temperature,
                                                   **self.replay_args(part.logs, width))
        return _padded(ref, width, self.policy.device)

    def _update(self, batch: PolicyBatch) -> dict[str, float]:
        """`num_iterations` optimizer updates, each accumulating gradients over replay micro-batches
        (`replay_batch_size` rows) and segments; an empty batch (all groups filtered) steps nothing."""
        stats, loss, norms = LossStats(), 0.0, []
        for _ in range(self.config.num_iterations):
            self.optimizer.zero_grad(set_to_none=True)
            for span in self.replay_spans(len(batch), batch.width, train=True):
                part_loss, part_stats = self._replay_loss(batch.rows(*span))
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
                batch.mask[rows, start:end], c.epsilon, c.epsilon_high, c.beta,
                None if batch.ref is None else batch.ref[rows, start:end])
            total = terms.sum()
            stats, loss = stats + seg, loss + total.item()
            return total

        self.policy.replay_logprobs(batch.prompt_ids, batch.completions, loss_fn=loss_fn, temperature=c.temperature,
                                    **self.replay_args(batch.logs, batch.width), **self._backprop_kwargs())
        return loss, stats

    def _postfix(self, metrics: dict[str, float]) -> dict[str, str]:
        return {"reward": f"{metrics['reward']:.3f}", "tok/s": f"{metrics['rollout_tokens_per_s']:.0f}"}


# --------------------------------------------------------------------------- SFT


class SFTTrainer(_Trainer):
    """Cross-entropy through the replay: teaches the bounded-cache policy to reproduce full-cache
    reasoning. Targets are the dataset's traces (`sft_targets: dataset`, column
    `data.completion_field`, cut at `max_completion_length`) or completions the base model samples under a
    full cache for each batch (`sft_targets: full_cache`). `prompts_per_step` traces make one batch,
    with the token-mean loss over the whole batch."""

    kind = "sft"
    plot_key = "loss"

    def _load_dataset(self, dataset: Sequence[dict] | None) -> list[dict]:
        rows = super()._load_dataset(dataset)
        field_name = self.config.data.completion_field
        if self.config.sft_targets == "full_cache":
            return rows
        for i, row in enumerate(rows):
            target = row.get(field_name)
            is_ids = isinstance(target, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in target)
            if not (isinstance(target, str) or is_ids) or not target:
                raise DataError(f"dataset row {i} has no text or token ids in {field_name!r} (the SFT target; set "
                                "data.completion_field)")
        return rows

    def train_step(self, examples: list[dict]) -> dict[str, float]:
        """One update on a batch of traces; `loss` is the token-mean NLL before the update."""
        c, device = self.config, self.policy.device
        prompt_ids = self.policy.encode([e["prompt"] for e in examples], c.data.chat_template, c.data.system_prompt)
        if c.sft_targets == "full_cache":
            completions = self._full_cache_traces(prompt_ids)
        else:
            completions = [self._target_ids(e[c.data.completion_field]) for e in examples]
        width = self.lockstep_width(completions)
        num_tokens = self.dp.sum([sum(map(len, completions))])[0]
        weights = _length_mask([len(x) for x in completions], width, device) / num_tokens
        loss = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        for a, b in self.replay_spans(len(completions), width, train=True):
            loss += self._replay_nll(prompt_ids[a:b], completions[a:b], weights[a:b])
        grad_norm = self.optimizer_step()
        return {"loss": self.dp.sum([loss])[0], "grad_norm": grad_norm, "num_tokens": num_tokens}

    def _replay_nll(self, prompt_ids: list[list[int]], completions: list[list[int]], weights: torch.Tensor) -> float:
        """Backward of the weighted NLL of one micro-batch, segment by segment; returns its value."""
        loss = 0.0

        def loss_fn(lp: torch.Tensor, start: int, end: int, rows: list[int]) -> torch.Tensor:
            nonlocal loss
            total = -(lp * weights[rows, start:end]).sum()
            loss += total.item()
            return total

        logs = self.policy.eviction_logs(prompt_ids, completions)  # None: the default schedule
        self.policy.replay_logprobs(prompt_ids, completions, loss_fn=loss_fn, temperature=1.0,
                                    **self.replay_args(logs, weights.shape[1]), **self._backprop_kwargs())
        return loss

    def _full_cache_traces(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """What the base model (adapters off) samples under a full cache: the behaviour the bounded
        policy should imitate. Seeds follow (seed, step, process), so a resumed run sees the same."""
        c, policy = self.config, self.policy
        with torch.no_grad(), adapters_disabled(policy.wrappers), policy.using_cache(CacheConfig(window=None)):
            result = policy.generate(
                prompt_ids, max_new_tokens=c.max_completion_length, temperature=c.temperature, top_p=c.top_p,
                top_k=c.top_k, seed=random.Random(f"sft:{c.seed}:{self.step}:{self.dp.rank}").randrange(2**31),
                chat_template=False)
        return result.completion_ids

    def _target_ids(self, target: str | list[int]) -> list[int]:
        """The trace's tokens plus EOS (no EOS when cut at max_completion_length: the trace goes on). A
        token-id target is taken as it is (its own EOS included), cut at max_completion_length."""
        if isinstance(target, list):
            return target[: self.config.max_completion_length]
        tokenizer = self.policy.tokenizer
        ids = tokenizer.encode(target, add_special_tokens=False)
        if len(ids) >= self.config.max_completion_length or tokenizer.eos_token_id is None:
            return ids[: self.config.max_completion_length]
        return ids + [tokenizer.eos_token_id]


__all__ = ["GRPOTrainer", "PolicyBatch", "SFTTrainer"]
