"""Continuous batching's bookkeeping: which prompt each of the B slots decodes and since which step,
which prompts still wait, and what each slot's sequence has produced (docs/design.md §1.1).

Everything the decode loop needs to know per step -- which sequences evict now (each on its own
clock), which reach their token budget -- follows from the steps at which sequences were admitted,
so it is host arithmetic, with no read of the device. That a sequence met an EOS the host learns
from an asynchronous copy of the done flags; tokens and log-probs stay on the device until a
sequence is seen finished at a sync point.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from ..config import CacheConfig
from .cache import Evicted
from .eviction import EvictionEvent, affects

SYNC_EVERY = 16  # steps between reads of the device (each is a host sync)


@dataclass
class Finished:
    """One finished sequence: its prompt's index in the request, tokens and log-probs (through the
    step that saw it finished: past an EOS, padding) and eviction log."""

    row: int
    tokens: torch.Tensor
    logprobs: torch.Tensor
    log: list[EvictionEvent]


class SlotTable:
    """Host side of the slots: the prompt each decodes (-1: idle), the step it was admitted at (its
    clock is the global step minus that), the queue of waiting prompts, and each slot's eviction log."""

    def __init__(self, num_prompts: int, slots: int | None, max_new_tokens: int, cache: CacheConfig):
        self.size = min(slots or num_prompts, num_prompts)
        self.queue = deque(range(num_prompts))
        self.row = np.full(self.size, -1)
        self.start = np.zeros(self.size, dtype=np.int64)
        self.n_new = max_new_tokens
        self.window = cache.window if cache.bounded else None
        self.block = cache.evict_block if cache.bounded else 0
        self.logs: list[list[EvictionEvent]] = [[] for _ in range(self.size)]
        # events whose tokens are still on the device: (slots, steps, tokens [layers, n, E])
        self._pending: list[tuple[list[int], list[int], torch.Tensor]] = []

    @property
    def occupied(self) -> np.ndarray:
        return self.row >= 0

    @property
    def finished(self) -> bool:
        """No prompt waits and no slot decodes one."""
        return not self.queue and not self.occupied.any()

    def clocks(self, step: int) -> np.ndarray:
        """The thought token each slot's sequence is at during global step `step`."""
        return step - self.start

    def due(self, step: int, lockstep: bool) -> bool:
        """Whether the host reads the device after step `step`: every SYNC_EVERY-th step, and when a
        sequence has its last token. Processes in lockstep must agree without asking each other:
        they read at the same steps (every 16th and the token budget's)."""
        if (step + 1) % SYNC_EVERY == 0:
            return True
        if lockstep:
            return step + 1 == self.n_new
        return bool((self.occupied & (self.clocks(step) >= self.n_new - 1)).any())

    def admit(self, step: int) -> tuple[list[int], list[int]]:
        """Hand free slots to waiting prompts (their first token is chosen at `step`); returns
        (slots, prompt indices)."""
        slots = [int(s) for s in np.flatnonzero(~self.occupied)][: len(self.queue)]
        rows = [self.queue.popleft() for _ in slots]
        for slot, row in zip(slots, rows, strict=True):
            self.row[slot], self.start[slot], self.logs[slot] = row, step, []
        return slots, rows

    def evicting(self, step: int) -> tuple[list[int], list[int]]:
        """The slots whose sequence's window is full before the token it feeds at `step`, and the
        sequences' own steps (none past a sequence's second-to-last token: nothing reads them)."""
        if self.window is None:
            return [], []
        t = self.clocks(step)
        full = (t >= self.window) & ((t - self.window) % self.block == 0)
        due = self.occupied & full & affects(t, self.n_new)
        slots = np.flatnonzero(due)
        return slots.tolist(), t[slots].tolist()

    def record(self, slots: list[int], steps: list[int], evicted: Evicted) -> None:
        """Log an eviction step; tokens chosen on the device are read at the next sync (`flush`)."""
        if evicted.listed is None:
            self._pending.append((slots, steps, evicted.tokens))
            return
        for slot, step, tokens in zip(slots, steps, evicted.listed, strict=True):
            self.logs[slot].append(EvictionEvent(step, tokens))

    def flush(self) -> None:
        """Move the per-layer choices of the pending events to the host (one transfer)."""
        if not self._pending:
            return
        tokens = torch.cat([t for _, _, t in self._pending], 1).transpose(0, 1).tolist()  # [events, L, E]
        events = [pair for slots, steps, _ in self._pending for pair in zip(slots, steps, strict=True)]
        for (slot, step), layers in zip(events, tokens, strict=True):
            self.logs[slot].append(EvictionEvent(step, (), tuple(map(tuple, layers))))
        self._pending = []

    def release(self, slots: list[int]) -> None:
        for slot in slots:
            self.row[slot] = -1


class DonePeek:
    """The sequences' done flags as last copied to the host, read without waiting for the device.
    After every step an asynchronous copy starts (into pinned memory on CUDA; on the CPU it is
    immediate), and the host looks at the newest copy that has arrived: it learns that a sequence
    ended a step or two late instead of at the next periodic sync, and only then syncs."""

    def __init__(self, done: torch.Tensor):
        self.cuda = done.is_cuda
        self.host = torch.zeros(done.shape, dtype=torch.bool, pin_memory=self.cuda)
        self.arrived = torch.cuda.Event() if self.cuda else None
        self.step = -1  # the step whose flags `host` holds

    def start(self, done: torch.Tensor, step: int) -> None:
        """Copy the flags as they are after `step` (unless the previous copy is still on its way)."""
        if self.cuda and self.step >= 0 and not self.arrived.query():
            return
        self.host.copy_(done, non_blocking=self.cuda)
        self.step = step
        if self.cuda:
            self.arrived.record()

    def ended(self, table: SlotTable) -> bool:
        """Whether the newest arrived flags show an ended sequence (one admitted before they were taken)."""
        if self.step < 0 or (self.cuda and not self.arrived.query()):
            return False
        return bool((self.host.numpy() & table.occupied & (table.start <= self.step)).any())


class SlotOutputs:
    """What each slot's sequence has generated, on the device: tokens and log-probs [slots, capacity],
    written at each sequence's own clock."""

    def __init__(self, slots: int, capacity: int, device: torch.device, dtype: torch.dtype):
        self.capacity = capacity
        self.tokens = torch.zeros(slots, capacity, dtype=torch.long, device=device)
        self.logprobs = torch.zeros(slots, capacity, dtype=dtype, device=device)
        self._all = torch.arange(slots, device=device)

    def write(self, clock: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor,
              slots: torch.Tensor | None = None) -> None:
        """Record each slot's chosen token at its sequence's `clock` (slots past the capacity -- idle
        ones -- write into the last column, which no sequence reads)."""
        index = (self._all if slots is None else slots, clock.clamp_max(self.capacity - 1))
        self.tokens.index_put_(index, tokens)
        self.logprobs.index_put_(index, logprobs.to(self.logprobs.dtype))

    def read(self, table: SlotTable, slots: list[int], lengths: list[int]) -> list[Finished]:
        """The finished sequences in `slots`, `lengths` tokens each (one transfer per buffer)."""
        idx = torch.tensor(slots, device=self.tokens.device)
        width = max(lengths)
        tokens = self.tokens.index_select(0, idx)[:, :width].cpu()
        logprobs = self.logprobs.index_select(0, idx)[:, :width].cpu()
        return [Finished(int(table.row[s]), tokens[i, :n], logprobs[i, :n], table.logs[s])
                for i, (s, n) in enumerate(zip(slots, lengths, strict=True))]

    def tails(self, slots: list[int], counts: list[int], length: int) -> list[list[int]]:
        """The last `length` of the `counts` tokens the sequences in `slots` have (fewer at their
        start), for stop checks."""
        device = self.tokens.device
        end = torch.tensor(counts, device=device)[:, None]
        columns = (end - length + torch.arange(length, device=device)).clamp_min(0)
        rows = self.tokens.index_select(0, torch.tensor(slots, device=device)).gather(1, columns).tolist()
        return [row[max(0, length - n):] for row, n in zip(rows, counts, strict=True)]
