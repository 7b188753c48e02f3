"""How closely a policy under a bounded cache follows the full-cache model: the point of PTE is to
make the bounded model behave like the full-cache one, so this measures it token by token.

On the full-cache model's own greedy traces (:func:`full_cache_traces`), :func:`token_fidelity`
teacher-forces each trace through every policy under its cache (the segment-wise replay, so the
policy sees exactly what it would have seen while decoding) and compares its next-token
distribution with the full-cache model's at every token decoded after the first eviction:

* ``kl_after_eviction``: mean KL(full-cache model || policy), in nats per token;
* ``top1_agreement``: fraction of those tokens where the policy's most likely token is the trace's
  (the full-cache model's greedy choice).

:func:`answer_agreement` compares final answers of the policy's own greedy decoding with the
trace's (math-verify).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import CacheConfig
from ..engine.adapter import adapters_disabled
from ..engine.replay import default_schedule
from ..policy import GenerationResult, Policy, concat_rollouts
from ..tasks.answers import extract_answer
from ..tasks.rewards import make_math_reward


@dataclass
class TokenFidelity:
    """Sums over the compared tokens (add them over batches), and the means."""

    kl_sum: float = 0.0
    top1_hits: float = 0.0
    tokens: int = 0

    def __add__(self, other: TokenFidelity) -> TokenFidelity:
        return TokenFidelity(self.kl_sum + other.kl_sum, self.top1_hits + other.top1_hits,
                             self.tokens + other.tokens)

    @property
    def kl_after_eviction(self) -> float:
        return self.kl_sum / max(self.tokens, 1)

    @property
    def top1_agreement(self) -> float:
        return self.top1_hits / max(self.tokens, 1)


def full_cache_traces(policy: Policy, prompts: Sequence, max_new_tokens: int, batch_size: int = 16,
                      chat_template: bool = True, system_prompt: str | None = None) -> GenerationResult:
    """Greedy traces of the policy's base model (adapters off) with a full cache: the behaviour a
    bounded policy should reproduce."""
    parts = []
    with torch.no_grad(), adapters_disabled(policy.wrappers), policy.using_cache(CacheConfig(window=None)):
        for start in range(0, len(prompts), batch_size):
            batch = list(prompts[start : start + batch_size])
            parts.append(policy.generate(batch, max_new_tokens=max_new_tokens, temperature=0.0,
                                         chat_template=chat_template, system_prompt=system_prompt))
    return concat_rollouts(parts)


def token_fidelity(policies: dict[str, Policy], reference: Policy, prompt_ids: Sequence[Sequence[int]],
                   traces: Sequence[Sequence[int]], batch_size: int = 4) -> dict[str, TokenFidelity]:
    """Per policy, the KL to and top-1 agreement with `reference` (run with a full cache and its
    adapters off) on the tokens of `traces` decoded after the policy's first eviction. Each policy
    replays the traces under its own cache and eviction policy (`Policy.eviction_logs`)."""
    per_trace = sequence_fidelity(policies, reference, prompt_ids, traces, batch_size)
    return {name: sum(scores, TokenFidelity()) for name, scores in per_trace.items()}


@torch.no_grad()
def sequence_fidelity(policies: dict[str, Policy], reference: Policy, prompt_ids: Sequence[Sequence[int]],
                      traces: Sequence[Sequence[int]], batch_size: int = 4) -> dict[str, list[TokenFidelity]]:
    """`token_fidelity` trace by trace (for paired intervals over traces): per policy, one
    TokenFidelity per trace, in order."""
    out: dict[str, list[TokenFidelity]] = {name: [] for name in policies}
    for start in range(0, len(traces), batch_size):
        span = slice(start, start + batch_size)
        prompts, batch = list(prompt_ids[span]), list(traces[span])
        width = max(map(len, batch))
        ref = _distributions(reference, prompts, batch, width, full_cache=True)
        lengths = torch.tensor([len(t) for t in batch])
        targets = torch.zeros(len(batch), width, dtype=torch.long)
        for i, t in enumerate(batch):
            targets[i, : len(t)] = torch.tensor(t)
        for name, policy in policies.items():
            cache = policy.cache_config
            if not cache.bounded:
                raise ValueError(f"policy {name!r} has a full cache: nothing is evicted to compare after")
            first = default_schedule(width, cache)
            after = first[0].step + 1 if first else width  # token j is decoded after feeding token j - 1
            ours = _distributions(policy, prompts, batch, width, full_cache=False)
            positions = torch.arange(width)[None]
            mask = (positions >= after) & (positions < lengths[:, None])
            kl = (ref.exp() * (ref - ours)).sum(-1) * mask
            hits = (ours.argmax(-1) == targets) & mask
            out[name] += [TokenFidelity(kl[i].sum().item(), hits[i].sum().item(), int(mask[i].sum()))
                          for i in range(len(batch))]
    return out


def _distributions(policy: Policy, prompts: list[list[int]], traces: list[list[int]], width: int,
                   full_cache: bool) -> torch.Tensor:
    """[b, width, vocab] next-token log-distributions of the policy teacher-forced on `traces`
    (float32, on the CPU); with `full_cache`, the base model (adapters off) under a full cache."""
    out: torch.Tensor | None = None

    def keep(logprobs: torch.Tensor, start: int, end: int, rows: list[int]) -> None:
        nonlocal out
        if out is None:
            out = torch.zeros(len(traces), width, logprobs.shape[-1])
        out[rows, start:end] = logprobs[:, : end - start].float().cpu()

    if full_cache:
        with adapters_disabled(policy.wrappers), policy.using_cache(CacheConfig(window=None)):
            policy.replay_logprobs(prompts, traces, distribution_fn=keep)
    else:
        policy.replay_logprobs(prompts, traces, policy.eviction_logs(prompts, traces), distribution_fn=keep)
    assert out is not None
    return out


def answer_agreement(policy: Policy, prompts: Sequence, reference_texts: Sequence[str], max_new_tokens: int,
                     batch_size: int = 16, chat_template: bool = True,
                     system_prompt: str | None = None) -> tuple[float, int]:
    """Fraction of prompts whose greedy completion under the policy's cache has the same final answer
    (math-verify) as the reference text, over the prompts whose reference has a final answer;
    returns (agreement, number compared)."""
    golds = [extract_answer(t) for t in reference_texts]
    keep = [i for i, g in enumerate(golds) if g is not None]
    grade = make_math_reward()
    try:
        texts: list[str] = []
        for start in range(0, len(keep), batch_size):
            rows = keep[start : start + batch_size]
            texts += policy.generate([prompts[i] for i in rows], max_new_tokens=max_new_tokens,
                                     temperature=0.0, chat_template=chat_template,
                                     system_prompt=system_prompt).texts
        scores = grade(None, texts, answer=[golds[i] for i in keep])
    finally:
        grade.grader.close()
    graded = [s for s in scores if s is not None]
    return (sum(graded) / len(graded) if graded else 0.0), len(graded)


__all__ = ["TokenFidelity", "answer_agreement", "full_cache_traces", "sequence_fidelity", "token_fidelity"]
