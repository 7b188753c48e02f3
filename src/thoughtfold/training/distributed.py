"""Multi-process training over torch.distributed, as launched by `torchrun` / `accelerate launch`.

`DataParallel` is the data-parallel part every run uses: each process rolls out and replays its
share of the batch, and the (small) adapter gradients are summed by hand before identical optimizer
steps. With `fsdp`, the frozen base model's weights are also sharded across the processes (FSDP2,
`fully_shard` per decoder layer): each process then holds 1/N of the base weights and all-gathers a
layer's weights just before using them, so a model that does not fit one GPU can be trained. The
adapter matrices stay whole on every process (FSDP ignores them), so gradient summing, clipping,
optimizer state and checkpoints are exactly those of the data-parallel case.

Sharded layers issue collectives inside every forward and backward, so every process must run the
same number of them: `lockstep` is the hook the rollout uses to stop all processes at the same
step, and the trainer pads replays to the same length and the same number of micro-batches.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..engine.adapter import LowRankLinear


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
