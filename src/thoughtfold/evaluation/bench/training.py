"""The benchmarks of training work, through the shipped engine and trainer: a replay + backward and a
whole GRPO step against the completion length (PTE under the bounded cache, a row per backprop
mode, against LoRA with a full cache), and what each eviction policy costs in decoding and in a
GRPO step."""

from __future__ import annotations

import gc
import random
import tempfile
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import torch

from ...config import BACKPROP, CacheConfig, TrainConfig
from ...policy import Policy
from ...training.grpo import GRPOTrainer
from .config import BenchConfig
from .measure import measure, progress, random_model, random_prompts, seconds
from .table import Table

REPLAY_TITLE = "Replay + backward: time and peak memory vs completion length"
GRPO_TITLE = ("One GRPO step (rollouts + rewards + replay update): time and peak memory vs completion "
              "length")
GRPO_NOTE = ("For scale: the paper reports a PTE / LoRA peak of about 0.55x at 3K tokens with W = 1K "
             "(Qwen2.5-3B).")
EVICTION_TITLE = "Eviction policies: decode speed and GRPO step time of PTE under the bounded cache"
EVICTION_NOTE = ("For scale: the paper reports about +37% runtime for PTE with HeadKV eviction over the "
                 "sliding window (DeepSeek-R1-Distill-Llama-8B).")
LORA = "LoRA, full cache (any backprop)"

Result = tuple[float, int, int | None] | None  # seconds, peak bytes, total peak bytes; None: out of memory
Prepare = Callable[[Policy, int, str], Callable[[], object]]


def replay_benchmark(config: BenchConfig) -> Table:
    """Peak memory and time of one replay + backward of `batch` equal completions."""
    model = random_model(config.shape, config.device, getattr(torch, config.dtype_name))

    def prepare(policy: Policy, n: int, backprop: str) -> Callable[[], object]:
        tokens = random_prompts(config.shape, 1, 32 + n, seed=n)[0]
        prompt, completion = tokens[:32], tokens[32:]

        def replay(prompts: list[list[int]], completions: list[list[int]]) -> None:
            policy.replay_logprobs(prompts, completions, loss_fn=lambda lp, a, b, rows: -lp.mean(),
                                   backprop=backprop)

        replay([prompt], [completion[: config.window + 8]])  # warm-up: one eviction event
        return lambda: replay([prompt] * config.batch, [completion] * config.batch)

    return _pte_vs_lora(model, config, prepare, "replay", _comparison_table(REPLAY_TITLE, config))


def grpo_benchmark(config: BenchConfig) -> Table:
    """Peak memory and time of one `GRPOTrainer` step (rollouts of one group of `batch` completions +
    reward + the replay update, `replay_batch` rows per replay micro-batch) at forced completion
    lengths. The random-init model has no EOS token, so every completion has exactly the requested
    length, and a random reward keeps the group's advantages non-zero."""
    model = random_model(config.shape, config.device, getattr(torch, config.dtype_name))
    prompt = random_prompts(config.shape, 1)[0]
    table = _comparison_table(GRPO_TITLE, config, note=GRPO_NOTE)
    with tempfile.TemporaryDirectory() as tmp:

        def prepare(policy: Policy, n: int, backprop: str) -> Callable[[], object]:
            return grpo_step(policy, prompt, n, config, tempfile.mkdtemp(dir=tmp), backprop)

        return _pte_vs_lora(model, config, prepare, "grpo", table)


def grpo_step(policy: Policy, prompt: list[int], n: int, config: BenchConfig, output_dir: str,
              backprop: str = BACKPROP[0]) -> Callable[[], object]:
    """One `GRPOTrainer` step of a group of `batch` completions of exactly `n` tokens, warmed up: a
    trainer of short completions (one eviction event) first pays the one-time costs without doubling
    the run time at long lengths, and the measured trainer starts from its optimizer state."""

    def random_reward(prompts, completions, **_):
        return [random.random() for _ in prompts]

    def trainer(length: int, where: Path) -> GRPOTrainer:
        args = TrainConfig(num_generations=config.batch, prompts_per_step=1, max_completion_length=length,
                           max_steps=1, save_steps=0, output_dir=str(where), progress=False,
                           backprop=backprop, replay_batch_size=config.replay_batch)
        return GRPOTrainer(policy, random_reward, args, [{"prompt": prompt}])

    warm = trainer(min(n, config.window + 8), Path(output_dir) / "warm-up")
    warm.train_step(warm.next_examples(1))
    measured = trainer(n, Path(output_dir) / "measured")
    measured.optimizer.load_state_dict(warm.optimizer.state_dict())
    return lambda: measured.train_step(measured.next_examples(1))


def _comparison_table(title: str, config: BenchConfig, note: str | None = None) -> Table:
    header = ["completion tokens", "method", "seconds", "peak MiB"]
    formats = [None, None, "{:.2f}", "{:,.1f}"]
    if config.cuda:  # the allocator's peak including weights, adapters and optimizer state
        header, formats = [*header, "peak MiB with weights"], [*formats, "{:,.1f}"]
    return Table(title, header, formats, note=note, plot={3: "peak memory (MiB)", 2: "seconds"},
                 xlabel="completion tokens")


def _pte_vs_lora(model, config: BenchConfig, prepare: Prepare, name: str, table: Table) -> Table:
    """One measured call per completion length: PTE under the bounded cache once per backprop mode,
    LoRA with a full cache once (it never evicts, so every backprop mode runs the same).
    `prepare(policy, n, backprop)` warms up and returns the call to measure. On CUDA an
    out-of-memory call becomes a row saying so (the other rows still run)."""
    pte = {f"PTE, bounded, {b} backprop": b for b in config.backprops}
    variants = [(CacheConfig(window=config.window), replace(config.adapter, mode="pte"), pte),
                (CacheConfig(window=None), replace(config.adapter, mode="lora"), {LORA: BACKPROP[0]})]
    results: dict[tuple[int, str], Result] = {}
    for n in config.lengths_for(name):
        for cache, adapter, modes in variants:
            policy = Policy(model, None, cache=cache, adapter=adapter)
            for label, backprop in modes.items():
                results[n, label] = _measured(partial(prepare, policy, n, backprop), config.device)
                r = results[n, label]
                took = "out of memory" if r is None else f"{r[0]:.2f} s, peak {r[1] / 2**20:,.1f} MiB"
                progress(f"{name} {n} tokens, {label}: {took}")
            policy.unwrap()  # the next policy wraps a clean model
            gc.collect()  # free this policy's trainers now: on CUDA they would count in the next total
            if config.cuda:
                torch.cuda.empty_cache()  # and give back what an out-of-memory call left reserved
    add_comparison_rows(table, results, list(pte), config.cuda)
    return table


def _measured(prepare: Callable[[], Callable[[], object]], device: str) -> Result:
    try:
        return measure(prepare(), device)
    except torch.OutOfMemoryError:
        return None


def add_comparison_rows(table: Table, results: dict[tuple[int, str], Result], pte: list[str],
                        with_total: bool) -> None:
    """The measured rows, each PTE mode's peak against LoRA's per length, and (over several lengths)
    each PTE mode's peak at the longest length against the shortest: 1.00x when it is flat. With
    `with_total` (CUDA) a last column gives the allocator's peak including what the call found
    allocated (weights, adapters, optimizer state)."""
    def ratios(a: Result, b: Result) -> list[float | None]:
        picked = (1, 2) if with_total else (1,)
        return [a[i] / b[i] if a is not None and b is not None else None for i in picked]

    lengths = sorted({n for n, _ in results})
    for n in lengths:
        for label in [*pte, LORA]:
            r = results[n, label]
            cells = ["out of memory", None] if r is None else [r[0], r[1] / 2**20]
            table.add(n, label, *cells, *([None if r is None else r[2] / 2**20] if with_total else []))
        for label in pte:
            table.add(n, f"{label.removesuffix(' backprop')} / LoRA peak", None,
                      *ratios(results[n, label], results[n, LORA]), kind="ratio")
    first, last = lengths[0], lengths[-1]
    for label in pte if last != first else []:
        table.add(f"{last} vs {first}", f"{label}: peak at {last} / at {first} tokens", None,
                  *ratios(results[last, label], results[first, label]), kind="ratio")


def eviction_benchmark(config: BenchConfig) -> Table:
    """What a scored eviction policy costs: decode tokens/s (sampling `length` tokens per sequence)
    and the time of one GRPO step, PTE under the bounded cache, per policy, side by side with
    `oldest` (scored policies compute attention weights in every decode step and select per event;
    the replay only reads the log)."""
    model = random_model(config.shape, config.device, getattr(torch, config.dtype_name))
    ids = random_prompts(config.shape, config.batch)
    speed: dict[tuple[int, str], float] = {}
    step: dict[tuple[int, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for eviction in config.evictions:
            policy = Policy(model, None, cache=CacheConfig(window=config.window, eviction=eviction),
                            adapter=replace(config.adapter, mode="pte"))
            sample = partial(policy.generate, ids, temperature=1.0, seed=0)
            sample(max_new_tokens=config.window + 8)  # warm-up (headkv: calibration)
            for n in config.lengths_for("eviction"):
                took = seconds(partial(sample, max_new_tokens=n), config.device)
                speed[n, eviction] = config.batch * n / took
                update = grpo_step(policy, ids[0], n, config, tempfile.mkdtemp(dir=tmp))
                step[n, eviction] = seconds(update, config.device)
                progress(f"eviction {eviction}, {n} tokens: decode {speed[n, eviction]:,.0f} tokens/s, "
                         f"grpo step {step[n, eviction]:.2f} s")
            policy.unwrap()  # the next policy wraps a clean model
    header = ["tokens", "eviction", "decode tokens/s", "decode time vs oldest", "grpo step s",
              "grpo step vs oldest"]
    table = Table(EVICTION_TITLE, header, [None, None, "{:,.0f}", "{:.2f}x", "{:.2f}", "{:.2f}x"],
                  note=EVICTION_NOTE, plot={2: "decode tokens/s", 4: "GRPO step seconds"}, xlabel="tokens")
    base = "oldest" if "oldest" in config.evictions else config.evictions[0]
    for n in config.lengths_for("eviction"):
        for e in config.evictions:
            table.add(n, e, speed[n, e], speed[n, base] / speed[n, e], step[n, e], step[n, e] / step[n, base])
    return table
