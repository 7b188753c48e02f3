"""The rollout benchmark: continuous against static batching at the same number of slots, on a queue
of prompts whose completion lengths have a long tail.

Static batching decodes the queue in chunks of `slots` prompts, each until its longest sequence ends
(what GRPO did per `generation_batch_size` chunk); continuous batching hands a finished sequence's
slot to the next prompt. Both run PTE under the bounded cache through the engine's `rollout`, with
lengths forced: every sequence feeds given tokens and ends with an EOS at a length drawn from a
stated mix, so both decode exactly the same tokens (checked) and only the scheduling differs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from ...config import CacheConfig, SamplingConfig
from ...engine.rollout import RawRollout, RolloutOptions, rollout
from ...policy import Policy
from .config import BenchConfig
from .measure import measure, progress, random_model, random_prompts
from .table import Table

TITLE = "Rollouts: continuous vs static batching at the same slots, long-tailed completion lengths"
EOS, PAD = 1, 0  # the random-init model has no EOS of its own: forced tokens are drawn from 2 up
PROMPTS_PER_SLOT = 8  # the queue: 8 prompts per slot


@dataclass(frozen=True)
class LengthMix:
    """Completion lengths as fractions of the token budget: a share `at_budget` runs to the budget
    (it never ends by itself), the rest is lognormal with `median` and `sigma`, capped there."""

    median: float
    sigma: float
    at_budget: float
    about: str

    def draw(self, n: int, budget: int, seed: int = 0) -> list[int]:
        rng = np.random.default_rng(seed)
        lengths = np.exp(rng.normal(np.log(self.median * budget), self.sigma, n))
        lengths[rng.random(n) < self.at_budget] = budget
        return np.clip(np.round(lengths), 1, budget).astype(int).tolist()


MIXES = {
    # `thoughtfold eval --data gsm8k --limit 48 --max-new-tokens 512` (the bundled SmolLM2-135M, full
    # cache, T=0.6, top-p 0.95): the 42 traces that ended fit a lognormal of median 200 tokens and sigma
    # 0.42; 6 of 48 (12.5%) were still going at 512. As fractions of a 1,024-token budget:
    "gsm8k": LengthMix(0.195, 0.42, 0.125, "the bundled model's GSM8K lengths under a 1,024-token budget"),
    "hard": LengthMix(0.15, 0.6, 0.30, "30% run to the budget (hard problems), the rest short"),
}


def rollout_benchmark(config: BenchConfig) -> Table:
    """Per number of slots and length mix: a queue of PROMPTS_PER_SLOT x slots prompts decoded by
    static and by continuous batching (each warmed up), with useful tokens/s (tokens up to each EOS),
    decode steps (summed over static's chunks), slot occupancy (the share of slot-steps that decode a
    useful token) and peak memory."""
    model = random_model(config.shape, config.device, getattr(torch, config.dtype_name))
    policy = Policy(model, None, cache=CacheConfig(window=config.window),
                    adapter=replace(config.adapter, mode="pte"), compile_decode=config.compile_decode)
    budget = config.lengths_for("rollout")[-1]
    table = Table(TITLE, ["slots", "mix, batching", "useful tokens/s", "decode steps", "slot occupancy",
                          "peak MiB"], [None, None, "{:,.0f}", "{:,}", "{:.1%}", "{:,.1f}"],
                  plot={2: "useful tokens/s", 4: "slot occupancy"}, xlabel="slots", note=_note(budget))
    vocab = model.config.vocab_size
    _decode(policy, random_prompts(config.shape, 2), _forced([4, 4], 8, vocab), 1)  # warm-up
    for slots in config.slots:
        prompts = random_prompts(config.shape, PROMPTS_PER_SLOT * slots, seed=slots)
        for name in config.mixes:
            lengths = MIXES[name].draw(len(prompts), budget, seed=slots)
            label = f"{name} (mean {np.mean(lengths) / budget:.0%} of {budget})"
            results, same = _compare(policy, prompts, lengths, _forced(lengths, budget, vocab), slots,
                                     config.device)
            for method, cells in results.items():
                table.add(slots, f"{label}: {method}", *cells)
                progress(f"rollout {slots} slots, {name}, {method}: {cells[0]:,.0f} useful tokens/s, "
                         f"{cells[1]:,} steps, peak {cells[3]:,.1f} MiB")
            ratios = [c / s for c, s in zip(results["continuous"], results["static"], strict=True)]
            table.add(slots, f"{label}: continuous / static", *ratios, kind="ratio")
            table.add(slots, f"{label}: the same tokens both ways", "yes" if same else "NO", None, None, None,
                      kind="check")
    policy.unwrap()
    return table


def _compare(policy: Policy, prompts: list[list[int]], lengths: list[int], forced: torch.Tensor, slots: int,
             device: str) -> tuple[dict[str, tuple[float, int, float, float]], bool]:
    """Static and continuous batching of one queue: each one's (useful tokens/s, decode steps, slot
    occupancy, peak MiB), and whether both decoded the same tokens."""
    runs = {"static": lambda: _static(policy, prompts, forced, slots),
            "continuous": lambda: [_decode(policy, prompts, forced, slots)]}
    results, tokens = {}, {}
    for method, run in runs.items():
        parts: list[RawRollout] = []

        def call(run: Callable[[], list[RawRollout]] = run, parts: list[RawRollout] = parts) -> None:
            parts[:] = run()

        took, peak, _ = measure(call, device)
        steps = sum(p.steps for p in parts)
        decoded = sum(lengths) - len(lengths)  # each sequence's first token comes from its prefill
        results[method] = (sum(lengths) / took, steps, decoded / (steps * slots), peak / 2**20)
        tokens[method] = [t for p in parts for t in p.tokens]
    same = all(torch.equal(a, b) for a, b in zip(tokens["static"], tokens["continuous"], strict=True))
    return results, same


def _forced(lengths: list[int], budget: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """[len(lengths), budget] random tokens, each row ending with an EOS at its length."""
    generator = torch.Generator().manual_seed(seed)
    forced = torch.randint(2, vocab, (len(lengths), budget), generator=generator)
    for row, n in enumerate(lengths):
        forced[row, n - 1] = EOS
    return forced


def _decode(policy: Policy, prompts: list[list[int]], forced: torch.Tensor, slots: int | None) -> RawRollout:
    options = RolloutOptions(eos_ids={EOS}, pad_id=PAD, slots=slots, forced=forced,
                             cuda_graph=policy.cuda_graph, compile_step=policy.compile_decode)
    sampling = SamplingConfig(max_new_tokens=forced.shape[1], temperature=1.0)
    return rollout(policy.model, policy.folder, prompts, policy.cache_config, sampling, options)


def _static(policy: Policy, prompts: list[list[int]], forced: torch.Tensor, slots: int) -> list[RawRollout]:
    """Chunks of `slots` prompts, each decoded until its longest sequence ends."""
    return [_decode(policy, prompts[a : a + slots], forced[a : a + slots], None)
            for a in range(0, len(prompts), slots)]


def _note(budget: int) -> str:
    mixes = "; ".join(f"{name}: {m.about} (lognormal median {m.median:.0%} of the budget, sigma {m.sigma}, "
                      f"{m.at_budget:.1%} to the budget)" for name, m in MIXES.items())
    return (f"Budget {budget} new tokens; {PROMPTS_PER_SLOT} prompts per slot; lengths forced (EOS at a "
            f"drawn length). Mixes: {mixes}. Useful tokens: those up to each EOS; occupancy: the "
            "useful tokens decode steps produced / (decode steps x slots).")
