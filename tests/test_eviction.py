"""Eviction choices and their record: the default evicts the oldest block, and an event survives its
dict form (how eviction logs are stored and sent between processes)."""

from __future__ import annotations

from thoughtfold.eviction import EvictionEvent, OldestBlock


def test_oldest_block_evicts_the_first_cached_tokens():
    assert OldestBlock().select([4, 5, 9, 12], 2) == [4, 5]
    assert OldestBlock().select((4, 5), 3) == [4, 5]


def test_eviction_event_round_trips_through_its_dict():
    event = EvictionEvent(step=7, tokens=(0, 1, 2))
    assert event.to_dict() == {"step": 7, "tokens": [0, 1, 2]}
    assert EvictionEvent.from_dict(event.to_dict()) == event
