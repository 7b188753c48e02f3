"""Dense distillation (docs/design.md §1.6): the teacher's next-token distributions on given traces,
and the per-token KL from them to the bounded policy's distributions.

The default teacher is the policy's own base model with a full cache and its adapters off: the
behaviour PTE should recover under the bounded cache (the paper's pi^D ~ pi). It runs without
gradients, one sequence at a time, so at most one sequence's logits exist at once; each token's
distribution is kept as its `top_k` largest log-probs plus the log of the mass left over. The KL
between the two distributions coarsened to {the teacher's top-k tokens, everything else} is a lower
bound of the full KL that reaches it as k grows (`top_k=None` keeps the whole vocabulary: exact,
[tokens, vocab] per sequence).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import CacheConfig
from ..engine.adapter import adapters_disabled
from ..engine.eviction import EvictionEvent


@dataclass
class TeacherTargets:
    """The teacher's distributions at the completion tokens of a batch, padded to [b, n, k]:
    `logprobs` of the kept token `ids` (None: the whole vocabulary, in order) and `rest` [b, n],
    the log of the mass outside them (None with the whole vocabulary)."""

    logprobs: torch.Tensor
    ids: torch.Tensor | None
    rest: torch.Tensor | None

    def rows(self, rows: Sequence[int], start: int, end: int) -> TeacherTargets:
        """The targets of sequences `rows` at completion tokens [start, end)."""
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[rows, start:end]
        return TeacherTargets(cut(self.logprobs), cut(self.ids), cut(self.rest))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate near 0 and for very negative x; finite (and with finite
    gradients) at x = 0. Each branch only sees inputs it is safe on: torch.where would otherwise
    multiply the other branch's infinite gradient by zero."""
    x = x.clamp(max=0.0)
    near = x > -math.log(2.0)
    tiny = torch.finfo(x.dtype).tiny
    close = torch.log((-torch.expm1(torch.where(near, x, -1.0))).clamp_min(tiny))
    far = torch.log1p(-torch.exp(torch.where(near, -1.0, x)))
    return torch.where(near, close, far)


def _truncate(logprobs: torch.Tensor, top_k: int | None) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                  torch.Tensor | None]:
    """[n, vocab] log-probs -> (kept log-probs [n, k], their ids, log of the mass outside them)."""
    if top_k is None or top_k >= logprobs.shape[-1]:
        return logprobs, None, None
    kept, ids = logprobs.topk(top_k, dim=-1)
    return kept, ids, _log1mexp(kept.logsumexp(-1))


def _collector(kept: list[torch.Tensor]):
    """A replay distribution_fn that appends one sequence's segments of log-distributions to `kept`."""
    return lambda logprobs, start, end, rows: kept.append(logprobs[0, : end - start])


@torch.no_grad()
def teacher_targets(teacher, prompt_ids: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                    top_k: int | None, width: int | None = None) -> TeacherTargets:
    """The next-token distributions of `teacher` (a Policy, run with a full cache and its adapters
    off) at every token of each completion, one sequence at a time, truncated to `top_k`; padded
    to `width` tokens (default: the longest completion)."""
    width = max(width or 0, *map(len, completions))
    parts: list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]] = []
    with adapters_disabled(teacher.wrappers), teacher.using_cache(CacheConfig(window=None)):
        for prompt, completion in zip(prompt_ids, completions, strict=True):
            kept: list[torch.Tensor] = []
            teacher.replay_logprobs([prompt], [completion], distribution_fn=_collector(kept))
            parts.append(_truncate(torch.cat(kept), top_k))
    first = parts[0][0]
    logprobs = first.new_zeros(len(parts), width, first.shape[-1])
    ids = None if parts[0][1] is None else torch.zeros(logprobs.shape, dtype=torch.long, device=first.device)
    rest = None if parts[0][2] is None else first.new_zeros(len(parts), width)
    for i, (lp, idx, r) in enumerate(parts):
        logprobs[i, : len(lp)] = lp
        if ids is not None:
            ids[i, : len(lp)], rest[i, : len(lp)] = idx, r
    return TeacherTargets(logprobs, ids, rest)


def token_kl(student: torch.Tensor, target: TeacherTargets) -> torch.Tensor:
    """KL(teacher || student) per token [b, m] from the student's full log-distributions
    `student` [b, m, vocab] (with autograd) and the teacher's `target` at the same tokens."""
    teacher = target.logprobs.to(student.dtype)
    if target.ids is None:
        return (teacher.exp() * (teacher - student)).sum(-1)
    mine = student.gather(-1, target.ids)
    kl = (teacher.exp() * (teacher - mine)).sum(-1)
    rest = target.rest.to(student.dtype)
    # a token whose kept entries hold all of the teacher's mass (rest = -inf) has nothing left to compare
    finite_rest = torch.where(rest > -math.inf, rest, 0.0)
    return kl + rest.exp() * (finite_rest - _log1mexp(mine.logsumexp(-1)))


def first_distilled_token(log: Sequence[EvictionEvent], after_eviction: bool) -> int:
    """The first completion token the loss covers: 0, or with `after_eviction` the first token
    decoded after the row's first eviction event (token j is decoded from token j - 1, so an event
    at step s first affects token s + 1); a row that never evicts has none (a huge index)."""
    if not after_eviction:
        return 0
    return log[0].step + 1 if log else 2**62


__all__ = ["TeacherTargets", "first_distilled_token", "teacher_targets", "token_kl"]
