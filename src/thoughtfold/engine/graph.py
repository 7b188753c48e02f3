"""The one-token decode forward, eager or captured as a CUDA graph (docs/design.md §3).

Under the bounded cache every decode step has the same shapes and reads/writes the same buffers:
the cache's K/V ring, its slot-validity mask and write index (updated in place between steps), the
pinned adapter state. So the whole model forward can be captured once per rollout and replayed
each step with one launch instead of hundreds, which is what makes a small-batch decode step run
near the memory-bandwidth floor. Everything that changes per step outside those buffers (the token,
its position) is copied into static inputs before the replay.

A graph removes launch overhead but still runs the eager model's kernels, about 40 per decoder
layer, mostly tiny elementwise ones (RMSNorm, rotary, SiLU, residual adds). `compile=True` runs the
step through `torch.compile` first (inductor fuses those), then captures the compiled kernels.
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from .cache import BoundedKVCache, cache_kwarg

logger = logging.getLogger(__name__)

WARMUP_RUNS = 2  # eager runs on a side stream before capture (cuBLAS/SDPA workspaces, lazy init)


def _decode_forward(model: nn.Module, kwarg: str, cache: BoundedKVCache, ids: torch.Tensor,
                    positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{kwarg: cache})
    return out.logits[:, -1]


@functools.cache
def _compiled_decode_forward():
    """One compiled function for every rollout: the cache is an argument, so a new cache of the same
    shapes reuses the compiled code instead of recompiling."""
    return torch.compile(_decode_forward, dynamic=False)


class DecodeStep:
    """`step(tokens [B], positions [B], mask) -> logits [B, V]` for the token being admitted.

    With `capture=True` (CUDA only) the first call warms up and captures the forward; later calls
    replay it. The returned logits then live in the graph's output buffer: use them before the
    next call. A capture that fails (an op that syncs with the host, say) falls back to eager with
    one warning, so a model that cannot be captured is slower, never wrong."""

    def __init__(self, model: nn.Module, cache: BoundedKVCache, capture: bool = False, compile: bool = False):
        if capture and cache.slot_valid.device.type != "cuda":
            raise ValueError("CUDA-graph capture needs the model and cache on a CUDA device")
        self.model, self.cache, self.capture = model, cache, capture
        self.kwarg = cache_kwarg(model)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._run = _compiled_decode_forward() if compile else _decode_forward

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self._run(self.model, self.kwarg, self.cache, ids, positions, mask)

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not self.capture:
            return self._forward(tokens[:, None], positions[:, None], mask)
        if self.graph is None:
            return self._capture(tokens, positions, mask)
        self._ids.copy_(tokens[:, None])
        self._positions.copy_(positions[:, None])
        self.graph.replay()
        return self._logits

    def _capture(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Warm up, capture, replay once. Re-running the step is harmless: it rewrites the same
        cache slot with the same K/V."""
        self._ids, self._positions = tokens[:, None].clone(), positions[:, None].clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):
                logits = self._forward(self._ids, self._positions, mask)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._logits = self._forward(self._ids, self._positions, mask)
        except RuntimeError as err:
            logger.warning("CUDA-graph capture of the decode step failed (%s); decoding eagerly", err)
            self.capture = False
            return logits
        self.graph = graph
        graph.replay()
        return self._logits
