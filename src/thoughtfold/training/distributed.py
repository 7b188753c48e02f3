"""Multi-process training over torch.distributed, as launched by `torchrun` / `accelerate launch`.

`DataParallel` is the data-parallel part every run uses: each process rolls out and replays its
share of the batch, and the (small) adapter gradients are summed by hand before identical optimizer
steps. With `fsdp`, the frozen base model's weights are also sharded across the processes (FSDP2,
`fully_shard` per decoder layer): each process then holds 1/N of the base weights and all-gathers a
layer's weights just before using them, so a model that does not fit one GPU can be trained. The
adapter matrices stay whole on every process (FSDP ignores them), so gradient summing, clipping,
optimizer state and checkpoints are exactly those of the data-parallel case.

Sharded layers issue collectives inside every forward and backward, so every process must run the
same number of them: the rollouts stop all processes at the same step (`Policy.lockstep`), and a
`ReplayPlan` runs every process's replays with the same width, segments and number of micro-batches.
The trainers replay only through a `ReplayPlan`, so this module is the one place that knows.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..config import TrainConfig
from ..engine.adapter import LowRankLinear
from ..engine.eviction import EvictionEvent, OldestBlock
from ..engine.replay import LossFn
from ..engine.replay_memory import replay_row_bytes, rows_within
from ..errors import ConfigError
from ..policy import Policy


class DataParallel:
    """Data-parallel training over torch.distributed, as launched by `torchrun` / `accelerate launch`
    (WORLD_SIZE > 1): each process rolls out its share of the prompts, rewards are gathered so that
    advantages and loss weights are batch-wide, and gradients are summed before the optimizer step,
    which every process then takes identically. A single process needs no launcher."""

    def __init__(self) -> None:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        active = dist.is_available() and dist.is_initialized()
        self.rank = dist.get_rank() if active else 0
        self.world = dist.get_world_size() if active else 1

    @property
    def main(self) -> bool:
        """The process that logs, plots and writes checkpoints."""
        return self.rank == 0

    def local_rows(self, n: int) -> slice:
        """This process's `n` rows of a batch that holds every process's rows in rank order."""
        return slice(self.rank * n, (self.rank + 1) * n)

    def device(self) -> str | None:
        """The device of a model this process loads: its own GPU when several processes share a
        machine's GPUs, else None (the loader's default)."""
        if self.world > 1 and torch.cuda.is_available():
            return f"cuda:{torch.cuda.current_device()}"
        return None

    def gather(self, obj: Any) -> list[Any]:
        """Every process's `obj` (small, picklable), in rank order."""
        if self.world == 1:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of `values` over the processes."""
        return [sum(column) for column in zip(*self.gather(values), strict=True)]

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        """All-reduce the accumulated gradients in one flat buffer (missing ones count as zero)."""
        if self.world == 1:
            return
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        for p, chunk in zip(params, flat.split([g.numel() for g in grads]), strict=True):
            p.grad = chunk.view_as(p)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def max(self, value: int) -> int:
        """The largest `value` over the processes."""
        return max(self.gather(value))

    def all(self, flag: bool) -> bool:
        """True when `flag` holds on every process (the rollout's lockstep stop under FSDP)."""
        return all(self.gather(bool(flag)))


def shard_base_model(model: nn.Module, wrappers: list[LowRankLinear]) -> None:
    """FSDP2 over all processes: each decoder layer is one shard group, the embeddings, final norm and
    output projection form the root group. Adapter matrices are ignored (kept whole everywhere)."""
    from torch.distributed.fsdp import fully_shard

    adapter = {p for w in wrappers for p in (w.lora_down, w.lora_up)}
    for layer in model.get_decoder().layers:
        fully_shard(layer, ignored_params={p for p in layer.parameters() if p in adapter} or None)
    fully_shard(model, ignored_params=adapter or None)


def row_spans(n: int, size: int | None) -> list[tuple[int, int]]:
    """[start, end) chunks of `size` rows covering n rows (one chunk when size is None)."""
    size = size or max(n, 1)
    return [(i, min(i + size, n)) for i in range(0, n, size)]


@dataclass
class ReplayPlan:
    """How this process replays: micro-batches of at most `micro_batch` rows, split further so that
    each holds about `memory_gb` GiB of activations and logits (`engine.replay_memory` estimates a
    row from the model's shape; None: no limit), gradients crossing evictions as `backprop` says.
    The loss weights are batch-wide, so any split gives the same loss and gradients. In `lockstep`
    (FSDP over several processes) every forward and backward is a collective, so every process runs
    the same ones: replays are padded to the widest completion over all processes and follow the
    default eviction schedule at that width (the same segments everywhere), and a process with fewer
    micro-batches runs idle replays until all have run as many."""

    policy: Policy
    dp: DataParallel
    micro_batch: int | None = None
    backprop: str = "state"
    lockstep: bool = False
    memory_gb: float | None = None

    @classmethod
    def for_run(cls, policy: Policy, dp: DataParallel, config: TrainConfig) -> ReplayPlan:
        """The plan of a run; with `config.fsdp` over several processes this shards the base model
        and sets the policy to decode in lockstep (no graph capture: collectives run inside)."""
        lockstep = config.fsdp and dp.world > 1
        if lockstep:
            _check_default_schedule(policy)
            shard_base_model(policy.model, policy.wrappers)
            policy.configure_decoding(cuda_graph=False, compile_decode=False, lockstep=dp.all)
        return cls(policy, dp, config.replay_batch_size, config.backprop, lockstep, config.replay_memory_gb)

    def runs(self, rows: int) -> bool:
        """Whether a replay of `rows` rows runs on this process: always in lockstep (the others may
        have rows), else only when there are some."""
        return rows > 0 or self.lockstep

    def width(self, completions: Sequence[Sequence[int]]) -> int:
        """The width replays are padded to: the longest completion here, or over all processes."""
        width = max((len(c) for c in completions), default=0)
        return self.dp.max(width) if self.lockstep else width

    def rows_per_replay(self, prompt_tokens: int, width: int, loss_input: str = "tokens") -> int | None:
        """The most rows one replay takes under the memory budget (None: no limit), for prompts of
        at most `prompt_tokens` and completions padded to `width`."""
        if self.memory_gb is None:
            return None
        model = self.policy.model
        row = replay_row_bytes(model.config, next(model.parameters()).dtype, prompt_tokens, width,
                               self.policy.cache_config, self.backprop, loss_input)
        return rows_within(self.memory_gb * 2**30, row)

    def spans(self, n: int, width: int, train: bool, prompt_tokens: int = 0,
              loss_input: str = "tokens") -> Iterator[tuple[int, int]]:
        """Micro-batches of `n` rows (prompts of at most `prompt_tokens`): `micro_batch` rows each,
        split to fit the memory budget; in lockstep then idle replays (`train`: with a backward)
        until every process has replayed as many."""
        budget = self.rows_per_replay(prompt_tokens, width, loss_input)
        spans = [(a + c, a + d) for a, b in row_spans(n, self.micro_batch)
                 for c, d in row_spans(b - a, budget)]
        idle = self.dp.max(len(spans)) - len(spans) if self.lockstep else 0  # a collective: before any replay
        yield from spans
        for _ in range(idle):
            self._idle_replay(width, train)

    def replay(self, prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
               logs: Sequence[Sequence[EvictionEvent]] | None, width: int, loss_fn: LossFn | None = None,
               temperature: float = 1.0, loss_input: str = "tokens") -> list[torch.Tensor]:
        """`Policy.replay_logprobs` of these rows: with their eviction `logs` (None: the default
        schedule), or in lockstep with the default schedule padded to `width`."""
        schedule = {"eviction_log": None, "min_length": width} if self.lockstep else {"eviction_log": logs}
        return self.policy.replay_logprobs(prompt_ids, completions, loss_fn=loss_fn, temperature=temperature,
                                           backprop=self.backprop, loss_input=loss_input, **schedule)

    def _idle_replay(self, width: int, train: bool) -> None:
        """What a process with no rows left runs while the others replay: one padding sequence of
        `width` tokens with a zero loss, so its collectives match theirs."""
        pad = self.policy.pad_token_id
        loss_fn = (lambda lp, a, b, rows: lp.sum() * 0.0) if train else None
        self.replay([[pad]], [[pad] * max(width, 1)], None, width, loss_fn=loss_fn)


def _check_default_schedule(policy: Policy) -> None:
    """Lockstep replays follow the default oldest-block schedule on every process: refuse a policy
    whose rollouts evict otherwise."""
    if type(policy.eviction_policy) not in (type(None), OldestBlock):
        raise ConfigError("fsdp replays the default oldest-block eviction schedule on every process (all "
                          "must run the same segments), but this policy has a custom eviction_policy: train "
                          "without fsdp")
    if policy.cache_config.eviction != "oldest":
        raise ConfigError(f"fsdp replays the default oldest-block eviction schedule on every process, but "
                          f"cache.eviction is {policy.cache_config.eviction}: train without fsdp or with "
                          "cache.eviction=oldest")
