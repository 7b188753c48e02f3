"""Peak tensor memory of a block of code, on CUDA (allocator statistics) and on CPU (where torch
keeps no statistics: a dispatch mode counts the bytes of every live tensor storage created inside
the block). Only memory allocated inside the block counts, so weights loaded before are excluded."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _LiveBytes(TorchDispatchMode):
    """Counts every storage an op creates inside the block until it is freed. A storage an op
    merely views or writes in place (a weight's transpose inside a linear layer, a buffer filled in
    place) came from outside the block when no op inside created it: it is never counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._seen: set[int] = set()
        self._outside: set[int] = set()

    def _release(self, key: int, nbytes: int) -> None:
        self.live -= nbytes
        self._seen.discard(key)

    def _mark_outside(self, tensors: list) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                storage = t.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self._seen and key not in self._outside:
                    self._outside.add(key)
                    weakref.finalize(storage, self._outside.discard, key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._mark_outside(tree_flatten((args, kwargs))[0])
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self._seen or key in self._outside:
                continue
            self._seen.add(key)
            self.live += nbytes
            weakref.finalize(storage, self._release, key, nbytes)
            self.peak = max(self.peak, self.live)
        return out


class PeakMemory:
    """`with PeakMemory(device) as m: ...` then `m.peak_bytes`: the most bytes held at once by
    tensors allocated inside the block. On CUDA also `m.total_peak_bytes`: the allocator's peak
    including what was allocated before the block (weights, optimizer state), for comparisons with
    whole-process figures; None on CPU, where nothing tracks memory outside the block."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.peak_bytes = 0
        self.total_peak_bytes: int | None = None
        self._mode: _LiveBytes | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self._mode = _LiveBytes().__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.total_peak_bytes = torch.cuda.max_memory_allocated(self.device)
            self.peak_bytes = self.total_peak_bytes - self._start
        else:
            self._mode.__exit__(*exc)
            self.peak_bytes = self._mode.peak
