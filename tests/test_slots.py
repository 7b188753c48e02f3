"""The host side of continuous batching: admissions from the queue, each slot's eviction schedule on
its own clock, when the host reads the device, and reading finished sequences back."""

from __future__ import annotations

import torch

from thoughtfold import CacheConfig
from thoughtfold.engine.slots import SlotOutputs, SlotTable


def test_slots_evict_on_their_own_clocks():
    table = SlotTable(3, 2, 12, CacheConfig(window=4, evict_ratio=0.5))  # E = 2
    assert table.admit(0) == ([0, 1], [0, 1]) and list(table.queue) == [2]
    assert table.evicting(3) == ([], []) and table.evicting(4) == ([0, 1], [4, 4])
    assert table.evicting(5) == ([], []) and table.evicting(6) == ([0, 1], [6, 6])
    table.release([0])
    assert table.admit(7) == ([0], [2]) and table.finished is False
    assert table.evicting(8) == ([1], [8])  # slot 0's sequence is at its token 1
    assert table.evicting(11) == ([0], [4])
    assert table.evicting(10) == ([1], [10]) and table.evicting(12) == ([], [])  # token 11 is the last
    table.release([0, 1])
    assert table.finished and table.admit(20) == ([], [])
    assert SlotTable(3, None, 12, CacheConfig()).evicting(40) == ([], [])  # full cache: never


def test_the_host_reads_the_device_every_16_steps_and_at_token_budgets():
    table = SlotTable(2, 1, 20, CacheConfig(window=4))
    table.admit(3)
    assert [s for s in range(23) if table.due(s, lockstep=False)] == [15, 22]  # its 20th token: step 22
    assert [s for s in range(40) if table.due(s, lockstep=True)] == [15, 19, 31]  # the same steps everywhere
    table.release([0])
    assert [s for s in range(22, 40) if table.due(s, lockstep=False)] == [31]


def test_outputs_are_written_at_each_slots_clock_and_read_back():
    table = SlotTable(2, 2, 6, CacheConfig(window=4))
    table.admit(0)
    out = SlotOutputs(2, 6, torch.device("cpu"), torch.float64)
    for t in range(4):
        clock = torch.tensor([t, max(t - 1, 0)])
        out.write(clock, torch.tensor([10 + t, 20 + t]), torch.tensor([-1.0 * t, -2.0 * t]))
    assert out.tails([0, 1], [4, 3], 2) == [[12, 13], [22, 23]] and out.tails([1], [1], 5) == [[21]]
    first, second = out.read(table, [1, 0], [3, 2])
    assert (first.row, first.tokens.tolist()) == (1, [21, 22, 23])
    assert first.logprobs.tolist() == [-2.0, -4.0, -6.0]
    assert (second.row, second.tokens.tolist()) == (0, [10, 11])
