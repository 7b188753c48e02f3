"""The PTE wiring between the cache and the adapters: evicted K/V -> position-free keys ->
encoder state -> the adapters' S_l. The rollout and the replay both fold through this one class,
which is what makes their log-probs agree."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .adapter import LowRankLinear, set_states
from .encoder import EncoderState, ThoughtEncoder, derotate_keys


def _heads_last(t: torch.Tensor) -> torch.Tensor:
    """[L, B, H, E, D] -> [L, B, E, H*D]: the encoder sees each token's K or V across all heads."""
    return t.transpose(2, 3).flatten(3)


def _with_rows(state: EncoderState, rows: torch.Tensor, part: EncoderState) -> EncoderState:
    """`state` with sequences `rows` replaced by `part`'s (out of place: states stay functional)."""
    pairs = ((state.max, part.max), (state.norm, part.norm), (state.num, part.num))
    return EncoderState(*(None if t is None else t.index_copy(1, rows, p) for t, p in pairs))


def _rows(state: EncoderState, rows: torch.Tensor) -> EncoderState:
    return EncoderState(*(None if t is None else t.index_select(1, rows)
                          for t in (state.max, state.norm, state.num)))


class StateFolder:
    """Owns nothing trainable; it knows the model's rotary embedding, the encoder and the wrappers."""

    def __init__(self, model: nn.Module, wrappers: list[LowRankLinear], encoder: ThoughtEncoder | None):
        self.rotary = model.get_decoder().rotary_emb
        self.wrappers = wrappers
        self.encoder = encoder
        self.dtype = next(model.parameters()).dtype
        self._pinned: torch.Tensor | None = None  # the adapters' state buffer while pinned
        self.last: EncoderState | None = None  # the newest state (detached), for diagnostics

    @property
    def active(self) -> bool:
        return self.encoder is not None

    def start(self, batch: int) -> EncoderState | None:
        """State before the first eviction; also hands it to the adapters."""
        if self.encoder is None:
            return None
        state = self.encoder.initial_state(batch)
        self.apply(state)
        self.last = state.detach()
        return state

    def fold(
        self, state: EncoderState | None, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor,
        rows: torch.Tensor | None = None,
    ) -> EncoderState | None:
        """Absorb an evicted block. keys/values [L, B, kv_heads, E, head_dim] as cached (keys rotated
        at `positions`: [B, E] when every layer evicted the same tokens, else [L, B, E]); `rows`: the
        sequences of `state` the block came from (None: all, in order). Returns the new state and
        hands it to the adapters."""
        if self.encoder is None:
            return state
        dtype = self.encoder.queries.dtype
        cos, sin = self.rotary(keys.new_empty(0, dtype=dtype), positions.flatten(0, -2))
        cos, sin = cos.view(*positions.shape, -1), sin.view(*positions.shape, -1)
        free = derotate_keys(keys.to(dtype), cos, sin)  # [L, B, H, E, D]
        mine = state if rows is None else _rows(state, rows)
        mine = self.encoder.absorb(mine, _heads_last(free), _heads_last(values.to(dtype)))
        state = mine if rows is None else _with_rows(state, rows, mine)
        self.apply(state)
        self.last = state.detach()
        return state

    def reset(self, state: EncoderState | None, rows: torch.Tensor) -> EncoderState | None:
        """Sequences `rows` start afresh (a slot handed to a new prompt): their state is the initial one."""
        if self.encoder is None:
            return state
        state = _with_rows(state, rows, self.encoder.initial_state(len(rows)))
        self.apply(state)
        return state

    @contextmanager
    def fresh(self, batch: int) -> Iterator[None]:
        """Within the block the adapters read the initial state of `batch` new sequences (the prefill of
        admitted prompts); afterwards what they read before (a pinned buffer stays pinned)."""
        if self.encoder is None:
            yield
            return
        held = [w.state for w in self.wrappers]
        set_states(self.wrappers, self.encoder.initial_state(batch).read().to(self.dtype))
        try:
            yield
        finally:
            for w, state in zip(self.wrappers, held, strict=True):
                w.state = state

    def apply(self, state: EncoderState | None) -> None:
        """Hand S (cast once to the model's dtype) to the adapters; `None` also unpins."""
        if state is None:
            self._pinned = None
            set_states(self.wrappers, None)
        elif self._pinned is not None:
            self._pinned.copy_(state.read())
        else:
            set_states(self.wrappers, state.read().to(self.dtype))

    def pin(self, state: EncoderState | None) -> None:
        """From now until `apply(None)`, keep the adapters' state at one fixed address and update it
        in place, so a captured CUDA graph of the decode step sees every new state (no autograd)."""
        if state is not None:
            self._pinned = state.read().to(self.dtype).clone()
            set_states(self.wrappers, self._pinned)
