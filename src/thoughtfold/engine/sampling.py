"""Choosing each sequence's next token: greedy, sampled, or forced (docs/design.md §1.1).

Sampling draws from softmax(logits / temperature) cut by top-k / top-p. Every sequence of a request
has its own random stream, a function of (seed, its index in the request) only, so what it samples
does not depend on which slot decodes it, at which step it was admitted, or how many slots there are.
A stream is one uniform per generated token, and the token is where that uniform falls in the
cumulative distribution (inverse-CDF sampling: exact, and a single batched op for all slots, where
a generator per sequence would need a call per sequence and step).

Log-probs are those of the chosen token under softmax(logits / temperature) (temperature 1 for
greedy), before any top-p / top-k truncation -- the definition TRL uses for GRPO.
"""

from __future__ import annotations

import random

import torch

from ..config import SamplingConfig
from .adapter import wide_dtype


def row_uniforms(seed: int, row: int, count: int) -> torch.Tensor:
    """The first `count` uniforms in [0, 1) of the random stream of sequence `row` under `seed`
    (float64, on the CPU)."""
    stream = random.Random(f"{seed}:{row}").getrandbits(63)
    return torch.rand(count, generator=torch.Generator().manual_seed(stream), dtype=torch.float64)


def sample(logits: torch.Tensor, cfg: SamplingConfig, uniforms: torch.Tensor | None
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick the next token per row, greedy or at `uniforms` [B] (each row's next uniform); returns
    (tokens [B], logprobs [B]) with logprobs under the untruncated tempered distribution."""
    logits = logits.to(wide_dtype(logits.dtype))
    if cfg.temperature <= 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    scaled = logits / cfg.temperature
    logprobs = torch.log_softmax(scaled, -1)
    filtered = scaled
    if cfg.top_k and cfg.top_k < filtered.shape[-1]:
        kth = filtered.topk(cfg.top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = filtered.sort(-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= cfg.top_p  # keep the smallest prefix reaching top_p
        filtered = filtered.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    probs = filtered.softmax(-1)
    cdf = probs.double().cumsum(-1)
    at = (uniforms.to(cdf) * cdf[:, -1])[:, None]
    tokens = torch.searchsorted(cdf, at, right=True)[:, 0]  # first token whose mass ends above: skips zeros
    # a uniform just below 1 can round to the total: it falls in the last token with mass
    last = probs.shape[-1] - 1 - (probs > 0).flip(-1).int().argmax(-1)
    tokens = torch.minimum(tokens, last)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


class TokenChooser:
    """Each slot's next token: sampled from the random stream of the sequence it decodes, greedy, or
    `forced` [prompts, max_new_tokens] (teacher forcing: the given tokens, with their log-probs under
    the temperature). Slots learn their sequence from `start`."""

    def __init__(self, sampling: SamplingConfig, slots: int, device: torch.device,
                 forced: torch.Tensor | None = None):
        self.sampling = sampling
        self.seed = sampling.seed if sampling.seed is not None else int(torch.randint(2**62, ()).item())
        self.last = sampling.max_new_tokens - 1
        self.forced = None if forced is None else forced.to(device)
        self.row = torch.zeros(slots, dtype=torch.long, device=device)  # the prompt each slot decodes
        sampled = forced is None and sampling.temperature > 0
        self.uniforms = None
        if sampled:
            self.uniforms = torch.zeros(slots, self.last + 1, dtype=torch.float64, device=device)

    def start(self, slots: torch.Tensor, rows: list[int]) -> None:
        """Slots `slots` now decode prompts `rows` (indices in the request)."""
        self.row.index_copy_(0, slots, torch.tensor(rows, device=slots.device))
        if self.uniforms is not None:
            streams = torch.stack([row_uniforms(self.seed, r, self.last + 1) for r in rows])
            self.uniforms.index_copy_(0, slots, streams.to(slots.device))

    def __call__(self, logits: torch.Tensor, clock: torch.Tensor, slots: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens and log-probs for `logits` [n, V] of slots `slots` (None: all), whose sequences are at
        thought token `clock` [n]."""
        t = clock.clamp_max(self.last)[:, None]
        if self.forced is not None:
            row = self.row if slots is None else self.row.index_select(0, slots)
            token = self.forced[row[:, None], t][:, 0]
            scaled = logits.to(wide_dtype(logits.dtype)) / max(self.sampling.temperature, 1e-30)
            return token, torch.log_softmax(scaled, -1).gather(-1, token[:, None])[:, 0]
        uniforms = None
        if self.uniforms is not None:
            mine = self.uniforms if slots is None else self.uniforms.index_select(0, slots)
            uniforms = mine.gather(1, t)[:, 0]
        return sample(logits, self.sampling, uniforms)
