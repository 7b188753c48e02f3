"""Which cached thought tokens leave at an eviction event, and the record of each event. Its own
module because the choice is pluggable (`Policy(eviction_policy=...)`) and the record is shared by
the rollout that makes it and the replay that follows it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class EvictionEvent:
    """One eviction: before thought token `step` was processed, the thought tokens `tokens`
    (indices into the completion, 0 = first generated token) left the cache."""

    step: int
    tokens: tuple[int, ...]

    def to_dict(self) -> dict:
        return {"step": self.step, "tokens": list(self.tokens)}

    @classmethod
    def from_dict(cls, d: dict) -> EvictionEvent:
        return cls(step=int(d["step"]), tokens=tuple(int(t) for t in d["tokens"]))


class EvictionPolicy(Protocol):
    """Chooses which cached thought tokens leave at an eviction event. The rollout records the
    choice in the eviction log; the replay only reads the log, so any policy replays exactly."""

    def select(self, cached: Sequence[int], block: int) -> list[int]: ...


class OldestBlock:
    """The paper's policy: evict the `block` oldest thought tokens."""

    def select(self, cached: Sequence[int], block: int) -> list[int]:
        return list(cached[:block])
