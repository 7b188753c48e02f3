"""Dense distillation: the teacher's distributions (full cache, adapters off, one sequence at a time),
the top-k truncation with the remaining mass, and the per-token KL. Its gradient through the replay
is checked against the independent reference in test_reference.py."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import adapted_policy, assert_close_to_scale
from thoughtfold.engine.eviction import EvictionEvent
from thoughtfold.evaluation.fidelity import token_fidelity
from thoughtfold.training.distill import TeacherTargets, first_distilled_token, teacher_targets, token_kl

PROMPTS = [[5, 17, 99, 3, 42, 7, 8], [11, 12]]


def _distributions(seed: int, shape=(2, 3, 50)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(3 * torch.randn(*shape, generator=g, dtype=torch.float64), -1)


def test_full_vocabulary_kl_is_the_kl():
    teacher, student = _distributions(0), _distributions(1)
    kl = token_kl(student, TeacherTargets(teacher, None, None))
    assert_close_to_scale(kl, (teacher.exp() * (teacher - student)).sum(-1), rel=1e-12)
    assert bool((kl > 0).all())


def test_top_k_kl_is_the_kl_of_the_coarsened_distributions():
    """Kept entries compared one by one, everything else as one bucket: exactly the KL of the two
    distributions coarsened to k + 1 outcomes, a lower bound that reaches the full KL at k = vocab."""
    teacher, student = _distributions(2), _distributions(3)
    full = (teacher.exp() * (teacher - student)).sum(-1)
    previous = torch.zeros_like(full)
    for k in (1, 5, 20, 49):
        kept, ids = teacher.topk(k, -1)
        rest = torch.log1p(-kept.exp().sum(-1))
        kl = token_kl(student, TeacherTargets(kept, ids, rest))
        p = torch.cat([kept.exp(), rest.exp()[..., None]], -1)
        mine = student.gather(-1, ids).exp()
        q = torch.cat([mine, 1 - mine.sum(-1, keepdim=True)], -1)
        assert_close_to_scale(kl, (p * (p.log() - q.log())).sum(-1), rel=1e-10)
        assert bool((kl <= full + 1e-12).all()) and bool((kl >= previous - 1e-12).all())
        previous = kl
    assert_close_to_scale(previous, full, rel=0.5)


def test_kl_is_finite_when_the_kept_entries_hold_all_the_mass():
    teacher = torch.log_softmax(torch.tensor([[[0.0, 0.0, -1e4, -1e4]]], dtype=torch.float64), -1)
    kept, ids = teacher.topk(2, -1)
    target = TeacherTargets(kept, ids, torch.full((1, 1), -math.inf, dtype=torch.float64))
    student = torch.log_softmax(torch.tensor([[[5.0, 5.0, -50.0, -50.0]]], dtype=torch.float64), -1)
    student.requires_grad_()
    kl = token_kl(student, target)
    kl.sum().backward()
    assert math.isfinite(kl.item()) and bool(torch.isfinite(student.grad).all())


@pytest.mark.parametrize("top_k", [None, 7])
def test_teacher_targets_are_the_full_cache_base_model_one_sequence_at_a_time(tiny_dirs, top_k):
    """The default teacher: the policy's base model with a full cache and its adapters off, whatever
    the policy's own adapter and window; its per-token KL to the bounded policy, summed over the
    tokens after the first eviction, is the fidelity measure's."""
    policy = adapted_policy(tiny_dirs, "qwen2", "pte", window=6)
    torch.manual_seed(0)
    with torch.no_grad():
        for w in policy.wrappers:
            w.lora_up.normal_(std=0.3)
    completions = policy.generate(PROMPTS, max_new_tokens=20, temperature=1.0, seed=0).completion_ids
    targets = teacher_targets(policy, PROMPTS, completions, top_k=top_k, width=25)
    assert targets.logprobs.shape[:2] == (2, 25)
    exact = teacher_targets(policy, PROMPTS, completions, top_k=None)
    if top_k is not None:
        assert targets.ids.shape[-1] == top_k
        kept = exact.logprobs[:, :20].topk(top_k, -1).values
        assert_close_to_scale(targets.logprobs[:, :20], kept, rel=1e-6)
    kl_sum, tokens = 0.0, 0
    starts = [first_distilled_token(log, after_eviction=True) for log in
              policy.generate(PROMPTS, max_new_tokens=20, temperature=1.0, seed=0).eviction_log]

    def keep(lp, a, b, rows):
        nonlocal kl_sum, tokens
        kl = token_kl(lp, exact.rows(rows, a, b))
        for j, row in enumerate(rows):
            mask = torch.arange(a, b) >= starts[row]
            mask &= torch.arange(a, b) < len(completions[row])
            kl_sum += float(kl[j][mask].sum())
            tokens += int(mask.sum())

    policy.replay_logprobs(PROMPTS, completions, distribution_fn=keep)
    fidelity = token_fidelity({"pte": policy}, policy, PROMPTS, completions)["pte"]
    assert tokens == fidelity.tokens > 0
    assert kl_sum / tokens == pytest.approx(fidelity.kl_after_eviction, rel=1e-4)


def test_first_distilled_token_follows_the_first_event():
    log = [EvictionEvent(step=8, tokens=(0, 1)), EvictionEvent(step=10, tokens=(2, 3))]
    assert first_distilled_token(log, after_eviction=True) == 9
    assert first_distilled_token(log, after_eviction=False) == 0
    assert first_distilled_token([], after_eviction=True) > 10**9
