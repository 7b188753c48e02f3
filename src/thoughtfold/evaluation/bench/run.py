"""Micro-benchmarks that print tables: decode throughput and memory vs generated length (bounded vs
full cache vs HF `generate`), replay + backward and whole GRPO steps vs completion length (PTE
bounded, once per backprop mode, vs full-cache LoRA), and the encoder's cost per eviction event.

Random-init models of a chosen shape, so nothing is downloaded. On a CPU, time and memory are
measured in separate passes: the memory tracker slows every op, so it never runs while timing.

  thoughtfold bench [decode|replay|grpo|encoder|all] [--lengths ...] [--window 256] [--backprop ...]
                    [--output DIR]
"""

from __future__ import annotations

import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial

import torch

from ...config import BACKPROP, EVICTIONS, AdapterConfig, CacheConfig
from ...engine.adapter import AdapterGroup
from ...engine.attention import switch_attention
from ...models import head_dim
from ...policy import Policy
from ...render import markdown_table, pyplot
from .memory import PeakMemory

SHAPES = {
    # a small CPU-friendly model; Qwen2.5-3B's real shape for GPU runs
    "cpu-small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=4096),
    # a toy shape for smoke tests (seconds on a CPU)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936),
}


def random_model(shape: str, device: str, dtype: torch.dtype, max_positions: int = 131072):
    """A random-init Qwen2-architecture model of a named shape (weights do not matter for speed).
    Input and output embeddings are tied as in Qwen2.5-3B (a decode step reads the table once,
    as the output projection, either way)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=max_positions, tie_word_embeddings=True,
                      eos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _seconds(fn: Callable[[], object], device: str) -> float:
    """Wall-clock seconds of `fn`, device work included."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _measure(fn: Callable[[], object], device: str) -> tuple[float, int, int | None]:
    """(seconds, peak bytes allocated inside `fn`, on CUDA the allocator's peak including what was
    allocated before). On CUDA one run gives all three (the allocator keeps statistics); on CPU the
    memory tracker slows every op, so memory comes from a second, untimed run. Callers warm up first."""
    if device.startswith("cuda"):
        with PeakMemory(device) as mem:
            seconds = _seconds(fn, device)
        return seconds, mem.peak_bytes, mem.total_peak_bytes
    seconds = _seconds(fn, device)
    with PeakMemory(device) as mem:
        fn()
    return seconds, mem.peak_bytes, None


def copy_bandwidth(device: str, gib: float = 2.0) -> float:
    """Measured device-memory bandwidth in bytes/s: a large copy reads and writes every byte."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    seconds = _seconds(lambda: [b.copy_(a) for _ in range(10)], device)
    return 10 * 2 * a.numel() * a.element_size() / seconds


def decode_floor_seconds(model, batch: int, cached_tokens: int, bandwidth: float) -> float:
    """docs/design.md §3's floor for one decode step: read every weight once (the input embedding table
    only as the output projection) plus the K/V of `cached_tokens` per sequence."""
    cfg = model.config
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    element = next(model.parameters()).element_size()
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim(cfg) * element * cached_tokens * batch
    return (weights + kv) / bandwidth


DECODE_METHODS = ("bounded", "bounded-compiled", "full", "hf-static", "hf")


def default_decode_methods(device: str) -> tuple[str, ...]:
    """What `bench decode` compares unless told otherwise: compiled steps and HF's static cache +
    torch.compile only on CUDA (on a CPU they add minutes of compilation and measure little)."""
    if device.startswith("cuda"):
        return DECODE_METHODS
    return ("bounded", "full", "hf")


def decode_benchmark(shape: str, lengths: list[int], window: int, batch: int, device: str,
                     dtype: torch.dtype, baseline_max: int | None = None,
                     methods: tuple[str, ...] | None = None) -> list[list]:
    """Tokens/s and peak memory of decoding `length` new tokens with each method: `bounded` (CUDA
    graph on a GPU), `bounded-compiled` (torch.compile + CUDA graph), `full` (our full cache), `hf`
    (HF generate) and `hf-static` (HF static cache + torch.compile). The baselines (`full`, `hf`,
    `hf-static`) run only up to `baseline_max` new tokens (a full cache is slow and large at long
    lengths). Each method is warmed up (compiled) and measured before the next starts; a progress
    line per measurement goes to stderr. On CUDA a row gives each bounded step's share of the
    memory-bandwidth floor (docs/design.md §3)."""
    methods = tuple(methods or default_decode_methods(device))
    unknown = set(methods) - set(DECODE_METHODS)
    if unknown:
        raise ValueError(f"unknown decode methods {sorted(unknown)}; choose from {', '.join(DECODE_METHODS)}")
    prompt_len = 32
    model = random_model(shape, device, dtype)
    prompts = torch.randint(1, SHAPES[shape]["vocab_size"], (batch, prompt_len),
                            generator=torch.Generator().manual_seed(0)).to(device)
    ids = prompts.tolist()

    def hf(n, **kw):
        return model.generate(input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0, **kw)

    checks: dict[str, str] = {}

    def ours(cache: CacheConfig, compile_decode: bool = False, label: str = ""):
        policy = Policy(model, None, cache=cache, compile_decode=compile_decode)
        policy.generate(ids, max_new_tokens=window + 8, temperature=0)  # set-up costs, compilation
        if policy.cuda_graph or compile_decode:
            checks[label] = agreement_with_eager(policy, ids, CHECK_TOKENS)
        return lambda n: policy.generate(ids, max_new_tokens=n, temperature=0)

    graph = " (CUDA graph)" if device.startswith("cuda") else ""
    labels = {"bounded": f"bounded W={window}{graph}", "bounded-compiled": f"bounded W={window} (compiled{graph and ' + graph'})",
              "full": "full cache (ours)", "hf-static": "HF static cache + compile", "hf": "HF generate"}
    speed: dict[tuple[int, str], float] = {}
    peaks: dict[tuple[int, str], float] = {}
    for method in methods:
        baseline = method in ("full", "hf", "hf-static")
        todo = [n for n in lengths if not baseline or baseline_max is None or n <= baseline_max]
        if not todo:
            continue
        if method.startswith("bounded"):
            run = ours(CacheConfig(window=window), compile_decode=method == "bounded-compiled", label=labels[method])
        elif method == "full":
            run = ours(CacheConfig(window=None), label=labels[method])
        else:
            def run(n, static=method == "hf-static"):
                return hf(n, cache_implementation="static") if static else hf(n)
        with use_attention(model, "sdpa" if method.startswith("hf") else None):
            for n in todo:
                if method == "hf-static" or (method == "hf" and n == todo[0]):
                    run(n if method == "hf-static" else 16)  # compilation per static-cache length; first call
                seconds, peak, _ = _measure(lambda n=n, run=run: run(n), device)
                speed[n, method], peaks[n, method] = batch * n / seconds, peak / 2**20
                print(f"  decode {n} new tokens, {labels[method]}: {speed[n, method]:,.0f} tokens/s, "
                      f"peak {peaks[n, method]:,.1f} MiB", file=sys.stderr, flush=True)
    bandwidth = copy_bandwidth(device) if device.startswith("cuda") else None
    rows = []
    for n in lengths:
        measured = [m for m in methods if (n, m) in speed]
        rows += [[n, labels[m], f"{speed[n, m]:,.0f}", f"{peaks[n, m]:,.1f}"] for m in measured]
        ours_best = max((m for m in measured if m.startswith("bounded")), key=lambda m: speed[n, m], default=None)
        for m in measured:
            if ours_best and m.startswith("hf"):
                rows.append([n, f"{labels[ours_best]} / {labels[m]}", f"{speed[n, ours_best] / speed[n, m]:.2f}x", ""])
        for m in measured:
            if bandwidth is not None and m.startswith("bounded"):
                floor = decode_floor_seconds(model, batch, prompt_len + min(n, window), bandwidth)
                rows.append([n, f"{labels[m]} step vs floor ({floor * 1e3:.2f} ms at {bandwidth / 1e12:.2f} TB/s copy)",
                             f"{floor * speed[n, m] / batch:.0%}", ""])
    rows += [[CHECK_TOKENS, f"{label}: tokens vs eager decoding (greedy)", verdict, ""] for label, verdict in checks.items()]
    return rows


CHECK_TOKENS = 64  # greedy tokens per sequence compared between a captured/compiled step and eager


def agreement_with_eager(policy: Policy, ids: list[list[int]], tokens: int) -> str:
    """Decode `tokens` greedy tokens with `policy` (CUDA graph and/or compiled step) and with the same
    model decoding eagerly, and say whether the tokens agree (the bench's correctness check)."""
    eager = Policy(policy.model, None, cache=policy.cache_config, cuda_graph=False)
    want = eager.generate(ids, max_new_tokens=tokens, temperature=0).completion_ids
    got = policy.generate(ids, max_new_tokens=tokens, temperature=0).completion_ids
    differ = [t for g, w in zip(got, want, strict=True) if (t := _first_difference(g, w)) is not None]
    if not differ:
        return f"same ({len(ids)} x {tokens} tokens)"
    return f"{len(differ)} of {len(ids)} sequences differ, first at token {min(differ)}"


def _first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first differing token (a length difference counts); None if equal."""
    first = next((t for t, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    return None if first == len(a) == len(b) else first


@contextmanager
def use_attention(model, name: str | None) -> Iterator[None]:
    """Run HF's own baselines on its stock attention function (the policies switch the model to the
    grouped decode path); `None` leaves the model as it is."""
    previous = switch_attention(model, name)
    try:
        yield
    finally:
        switch_attention(model, previous)


def _pte_vs_lora(model, lengths: list[int], window: int, adapter: AdapterConfig, backprops: tuple[str, ...],
                 device: str, prepare: Callable[[Policy, int, str], Callable[[], object]],
                 what: str) -> list[list]:
    """Time and peak memory of one measured call per completion length: PTE under the bounded cache
    once per `backprops` mode, LoRA with a full cache once (it never evicts, so every backprop mode
    runs the same). `prepare(policy, n, backprop)` warms up and returns the call to measure. On
    CUDA an out-of-memory call becomes a row saying so (the other rows still run)."""
    pte = {f"PTE, bounded, {b} backprop": b for b in backprops}
    lora = "LoRA, full cache (any backprop)"
    variants = [(CacheConfig(window=window), replace(adapter, mode="pte"), pte),
                (CacheConfig(window=None), replace(adapter, mode="lora"), {lora: BACKPROP[0]})]
    results: dict[tuple[int, str], tuple[float, int, int | None] | None] = {}
    for n in lengths:
        for cache, config, modes in variants:
            policy = Policy(model, None, cache=cache, adapter=config)
            for label, backprop in modes.items():
                try:
                    results[n, label] = _measure(prepare(policy, n, backprop), device)
                    seconds, peak = results[n, label][:2]
                    print(f"  {what} {n} tokens, {label}: {seconds:.2f} s, peak {peak / 2**20:,.1f} MiB",
                          file=sys.stderr, flush=True)
                except torch.OutOfMemoryError:
                    results[n, label] = None
                    print(f"  {what} {n} tokens, {label}: out of memory", file=sys.stderr, flush=True)
            policy.unwrap()  # the next policy wraps a clean model
            gc.collect()  # free this policy's trainers now: on CUDA their memory would count in the next total
            if device.startswith("cuda"):
                torch.cuda.empty_cache()  # and give back what an out-of-memory call left reserved
    return _comparison_rows(results, lengths, list(pte), lora, device.startswith("cuda"))


def _comparison_rows(results: dict, lengths: list[int], pte: list[str], lora: str, with_total: bool) -> list[list]:
    """The measured rows, each PTE mode's peak against LoRA's per length, and (over several lengths)
    each PTE mode's peak at the longest length against the shortest: 1.00x when it is flat. With
    `with_total` (CUDA) a last column gives the allocator's peak including what the call found
    allocated (weights, adapters, optimizer state)."""
    def ratio(a, b, i: int) -> str:
        return f"{a[i] / b[i]:.2f}x" if a is not None and b is not None else ""

    rows = []
    for n in lengths:
        for label in [*pte, lora]:
            r = results[n, label]
            cells = ["out of memory", ""] if r is None else [f"{r[0]:.2f}", f"{r[1] / 2**20:,.1f}"]
            if with_total:
                cells.append("" if r is None else f"{r[2] / 2**20:,.1f}")
            rows.append([n, label, *cells])
        for label in pte:
            a, b = results[n, label], results[n, lora]
            rows.append([n, f"{label.removesuffix(' backprop')} / LoRA peak", "", ratio(a, b, 1),
                         *([ratio(a, b, 2)] if with_total else [])])
    first, last = lengths[0], lengths[-1]
    if last != first:
        for label in pte:
            a, b = results[last, label], results[first, label]
            rows.append([f"{last} vs {first}", f"{label}: peak at {last} / at {first} tokens", "", ratio(a, b, 1),
                         *([ratio(a, b, 2)] if with_total else [])])
    return rows


def replay_benchmark(shape: str, lengths: list[int], window: int, batch: int, device: str,
                     dtype: torch.dtype, adapter: AdapterConfig, backprops: tuple[str, ...] = BACKPROP) -> list[list]:
    """Peak memory and time of one replay + backward of `batch` equal completions: PTE (bounded) per
    backprop mode vs LoRA (full cache)."""
    model = random_model(shape, device, dtype)
    vocab = SHAPES[shape]["vocab_size"]

    def prepare(policy: Policy, n: int, backprop: str) -> Callable[[], object]:
        g = torch.Generator().manual_seed(n)
        prompt = torch.randint(1, vocab, (32,), generator=g).tolist()
        completion = torch.randint(1, vocab, (n,), generator=g).tolist()

        def replay(prompts: list[list[int]], completions: list[list[int]]) -> None:
            policy.replay_logprobs(prompts, completions, loss_fn=lambda lp, a, b, rows: -lp.mean(), backprop=backprop)

        replay([prompt], [completion[: window + 8]])  # warm-up: one eviction event
        return lambda: replay([prompt] * batch, [completion] * batch)

    return _pte_vs_lora(model, lengths, window, adapter, backprops, device, prepare, "replay")


def grpo_benchmark(shape: str, lengths: list[int], window: int, batch: int, device: str,
                   dtype: torch.dtype, adapter: AdapterConfig, backprops: tuple[str, ...] = BACKPROP,
                   replay_batch: int | None = None) -> list[list]:
    """Peak memory and time of one GRPO step (rollouts of one group of `batch` completions + reward +
    the replay update, `replay_batch` rows per replay micro-batch) at forced completion lengths:
    PTE under the bounded cache per backprop mode vs LoRA with a full cache. Runs the real
    `GRPOTrainer` after a short warm-up step. The random-init model has no EOS token, so every completion
    has exactly the requested length, and a random reward keeps the group's advantages non-zero."""
    import tempfile

    model = random_model(shape, device, dtype)
    prompt = torch.randint(1, SHAPES[shape]["vocab_size"], (32,), generator=torch.Generator().manual_seed(0)).tolist()
    with tempfile.TemporaryDirectory() as tmp:

        def prepare(policy: Policy, n: int, backprop: str) -> Callable[[], object]:
            return _grpo_step(policy, prompt, n, batch, window, tempfile.mkdtemp(dir=tmp), backprop, replay_batch)

        return _pte_vs_lora(model, lengths, window, adapter, backprops, device, prepare, "grpo step")


def _grpo_step(policy: Policy, prompt: list[int], n: int, batch: int, window: int, output_dir: str,
               backprop: str = BACKPROP[0], replay_batch: int | None = None) -> Callable[[], object]:
    """One `GRPOTrainer` step of a group of `batch` completions of exactly `n` tokens, warmed up:
    a short step (one eviction event) first pays the one-time costs, optimizer state included,
    without doubling the run time at long lengths. A random reward keeps the advantages non-zero."""
    import random

    from ...config import TrainConfig
    from ...training.grpo import GRPOTrainer

    def random_reward(prompts, completions, **_):
        return [random.random() for _ in prompts]

    config = TrainConfig(num_generations=batch, prompts_per_step=1, max_completion_length=min(n, window + 8),
                         max_steps=1, save_steps=0, output_dir=output_dir, progress=False, backprop=backprop,
                         replay_batch_size=replay_batch)
    trainer = GRPOTrainer(policy, random_reward, config, [{"prompt": prompt}])
    trainer.train_step(trainer.next_examples(1))
    trainer.config = replace(config, max_completion_length=n)
    return lambda: trainer.train_step(trainer.next_examples(1))


def eviction_benchmark(shape: str, lengths: list[int], window: int, batch: int, device: str,
                       dtype: torch.dtype, adapter: AdapterConfig, evictions: tuple[str, ...] = EVICTIONS) -> list[list]:
    """What a scored eviction policy costs: decode tokens/s (sampling `length` tokens per sequence)
    and the time of one GRPO step, PTE under the bounded cache, per policy, side by side with
    `oldest` (scored policies compute attention weights in every decode step and select per event;
    the replay only reads the log)."""
    import tempfile

    model = random_model(shape, device, dtype)
    prompts = torch.randint(1, SHAPES[shape]["vocab_size"], (batch, 32), generator=torch.Generator().manual_seed(0))
    ids = prompts.tolist()
    speed: dict[tuple[int, str], float] = {}
    step: dict[tuple[int, str], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for eviction in evictions:
            policy = Policy(model, None, cache=CacheConfig(window=window, eviction=eviction),
                            adapter=replace(adapter, mode="pte"))
            policy.generate(ids, max_new_tokens=window + 8, temperature=1.0, seed=0)  # warm-up (headkv: calibration)
            for n in lengths:
                seconds = _seconds(partial(policy.generate, ids, max_new_tokens=n, temperature=1.0, seed=0), device)
                speed[n, eviction] = batch * n / seconds
                step[n, eviction] = _seconds(_grpo_step(policy, ids[0], n, batch, window, tempfile.mkdtemp(dir=tmp)),
                                             device)
                print(f"  eviction {eviction}, {n} tokens: decode {speed[n, eviction]:,.0f} tokens/s, "
                      f"grpo step {step[n, eviction]:.2f} s", file=sys.stderr, flush=True)
            policy.unwrap()  # the next policy wraps a clean model
    rows = []
    for n in lengths:
        for eviction in evictions:
            base = "oldest" if "oldest" in evictions else evictions[0]
            rows.append([n, eviction, f"{speed[n, eviction]:,.0f}", f"{speed[n, base] / speed[n, eviction]:.2f}x",
                         f"{step[n, eviction]:.2f}", f"{step[n, eviction] / step[n, base]:.2f}x"])
    return rows


def encoder_benchmark(shape: str, window: int, batch: int, device: str, dtype: torch.dtype,
                      tokens: int, adapter: AdapterConfig, compile_decode: bool = False,
                      repeats: int = 3) -> list[list]:
    """What PTE adds to decoding: the encoder's cost per eviction event against the decode time of
    the E tokens between events, and whole rollouts of `tokens` tokens with no adapter, a static
    LoRA, PTE, and PTE with one adapter GEMM per linear (no grouping of shared-input siblings). Each
    rollout time is the median of `repeats` runs after a warm-up (which compiles, with
    `compile_decode`)."""
    model = random_model(shape, device, dtype)
    prompts = torch.randint(1, SHAPES[shape]["vocab_size"], (batch, 32), generator=torch.Generator().manual_seed(0))
    ids = prompts.tolist()
    times, events = {}, 0

    def timed(label: str, policy: Policy) -> None:
        nonlocal events
        policy.generate(ids, max_new_tokens=window + 8, temperature=0)  # warm-up: set-up costs, compilation
        results = []
        runs = [_seconds(lambda: results.append(policy.generate(ids, max_new_tokens=tokens, temperature=0)), device)
                for _ in range(repeats)]
        times[label], events = statistics.median(runs), results[-1].stats["evictions"]
        print(f"  encoder bench: {label} rollout of {tokens} tokens: {times[label]:.2f} s", file=sys.stderr, flush=True)

    for mode in ("none", "lora", "pte"):
        policy = Policy(model, None, cache=CacheConfig(window=window), adapter=replace(adapter, mode=mode),
                        compile_decode=compile_decode)
        timed(mode, policy)
        if mode == "pte":
            for wrapper in policy.wrappers:
                wrapper.group = AdapterGroup([wrapper])
            timed("pte ungrouped", policy)
        policy.unwrap()  # the next policy wraps a clean model
    cfg, encoder = policy.cache_config, policy.encoder  # the pte policy's
    layers, kv_dim = encoder.key_proj.shape[:2]
    keys = torch.randn(layers, batch, cfg.evict_block, kv_dim, device=device)
    state = encoder.initial_state(batch)
    with torch.no_grad():
        encoder.absorb(state, keys, keys)
        per_event = _seconds(lambda: [encoder.absorb(state, keys, keys) for _ in range(20)], device) / 20
    step = times["none"] / tokens
    compiled = ", compiled" if compile_decode else ""
    return [
        [f"decode step (no adapter{compiled})", f"{step * 1e3:.2f} ms"],
        [f"encoder absorb, one event (E={cfg.evict_block})", f"{per_event * 1e3:.2f} ms"],
        ["encoder / decode of E tokens", f"{per_event / (step * cfg.evict_block):.1%}"],
        [f"PTE rollout / plain bounded rollout ({tokens} tokens, {events} events)", f"{times['pte'] / times['none']:.2f}x"],
        ["LoRA rollout / plain bounded rollout (adapter matmuls alone)", f"{times['lora'] / times['none']:.2f}x"],
        ["PTE with one adapter GEMM per linear (no sibling grouping) / plain",
         f"{times['pte ungrouped'] / times['none']:.2f}x"],
    ]


# --------------------------------------------------------------------------- all benchmarks + plots

DECODE_TITLE = "Decode: tokens/s and peak memory vs generated length"
DECODE_HEADER = ["new tokens", "method", "tokens/s", "peak MiB"]
REPLAY_TITLE = "Replay + backward: time and peak memory vs completion length"
REPLAY_HEADER = ["completion tokens", "method", "seconds", "peak MiB"]
TOTAL_PEAK = "peak MiB with weights"  # CUDA only: the allocator's peak including weights and optimizer state
GRPO_TITLE = "One GRPO step (rollouts + rewards + replay update): time and peak memory vs completion length"
ENCODER_TITLE = "Encoder overhead per eviction event"
ENCODER_HEADER = ["measure", "value"]
EVICTION_TITLE = "Eviction policies: decode speed and GRPO step time of PTE under the bounded cache"
EVICTION_HEADER = ["tokens", "eviction", "decode tokens/s", "decode time vs oldest", "grpo step s",
                   "grpo step vs oldest"]
EVICTION_NOTE = ("For scale: the paper reports about +37% runtime for PTE with HeadKV eviction over the sliding "
                 "window (DeepSeek-R1-Distill-Llama-8B).")
GRPO_NOTE = "For scale: the paper reports a PTE / LoRA peak of about 0.55x at 3K tokens with W = 1K (Qwen2.5-3B)."
DEFAULT_LENGTHS = {"decode": [256, 1024, 4096], "replay": [512, 2048, 8192], "grpo": [512, 1024, 2048],
                   "eviction": [1024]}
BENCHMARKS = ("decode", "replay", "grpo", "encoder", "eviction")


def _number_of(cell: object) -> float | None:
    """A table cell ('1,234', '12.5', 2048) as a float; None for blanks and ratios."""
    text = str(cell).replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        return None


def _series(rows: list[list], column: int) -> dict[str, list[tuple[float, float]]]:
    """{method: [(length, value), ...]} from a decode/replay table (ratio rows skipped)."""
    series: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        value = _number_of(row[column])
        if value is not None:
            series.setdefault(str(row[1]), []).append((float(row[0]), value))
    return series


def plot_lengths(rows: list[list], columns: dict[int, str], path, title: str, xlabel: str):
    """One panel per (column index -> y label) of a decode/replay table, value vs length per method
    (log2 length axis). Returns the path."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(columns), figsize=(5.2 * len(columns), 3.8), squeeze=False)
    for ax, (column, ylabel) in zip(axes[0], columns.items(), strict=True):
        for method, points in _series(rows, column).items():
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, marker="o", label=method)
        ax.set_xscale("log", base=2)
        lengths = sorted({int(x) for pts in _series(rows, column).values() for x, _ in pts})
        ax.set_xticks(lengths, [str(n) for n in lengths])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_benchmarks(which: str = "all", shape: str = "cpu-small", lengths: list[int] | None = None,
                   window: int = 256, batch: int = 4, tokens: int = 1024, device: str = "cpu",
                   dtype: torch.dtype | None = None, output_dir=None, baseline_max: int | None = None,
                   decode_methods: tuple[str, ...] | None = None, compile_decode: bool = False,
                   adapter: AdapterConfig | None = None, backprops: tuple[str, ...] = BACKPROP,
                   replay_batch: int | None = None, evictions: tuple[str, ...] = EVICTIONS) -> dict:
    """Run decode / replay / grpo / encoder (or all), print their tables and, with `output_dir`,
    write `bench.md` (the tables), `bench.json` (settings and tables, for scripts) and a plot per
    length sweep (`decode.png`: tokens/s and peak memory vs generated length; `replay.png`,
    `grpo.png`: peak memory and time vs completion length). `adapter` sets the rank and global
    tokens of the adapters (its mode is set per row); `backprops` the PTE rows of replay and grpo;
    `replay_batch` grpo's replay micro-batch rows (default: the whole group at once); `evictions`
    the policies the eviction benchmark compares. Returns
    {"tables": {name: rows}, "plots": [paths], "markdown": text}."""
    import json
    from pathlib import Path

    if which not in (*BENCHMARKS, "all"):
        raise ValueError(f"unknown benchmark {which!r}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {', '.join(sorted(SHAPES))}")
    dtype = dtype or (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    out = Path(output_dir) if output_dir is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
    torch.set_grad_enabled(True)
    where = (f"{device} ({torch.cuda.get_device_name(device)})" if device.startswith("cuda")
             else f"{device} ({torch.get_num_threads()} threads)")
    adapter = adapter or AdapterConfig()
    settings = {"shape": shape, "batch": batch, "window": window, "dtype": str(dtype), "device": where,
                "rank": adapter.rank, "global_tokens": adapter.global_tokens}
    if replay_batch is not None:
        settings["replay_batch"] = replay_batch
    header_line = " ".join(f"{k}={v}" for k, v in settings.items())
    print(header_line)
    pte_vs_lora = {"adapter": adapter, "backprops": backprops}
    replay_header = REPLAY_HEADER + ([TOTAL_PEAK] if device.startswith("cuda") else [])
    # name -> (run, title, header, plotted columns, x label)
    specs = {
        "decode": (partial(decode_benchmark, baseline_max=baseline_max, methods=decode_methods), DECODE_TITLE, DECODE_HEADER, {2: "tokens/s", 3: "peak memory (MiB)"},
                   "generated tokens"),
        "replay": (partial(replay_benchmark, **pte_vs_lora), REPLAY_TITLE, replay_header,
                   {3: "peak memory (MiB)", 2: "seconds"}, "completion tokens"),
        "grpo": (partial(grpo_benchmark, **pte_vs_lora, replay_batch=replay_batch), GRPO_TITLE, replay_header,
                 {3: "peak memory (MiB)", 2: "seconds"}, "completion tokens"),
        "eviction": (partial(eviction_benchmark, adapter=adapter, evictions=evictions), EVICTION_TITLE,
                     EVICTION_HEADER, {2: "decode tokens/s", 4: "GRPO step seconds"}, "tokens"),
    }
    tables: dict[str, list[list]] = {}
    records: dict[str, dict] = {}
    plots = []
    sections = ["# thoughtfold bench", "", header_line, ""]
    for name in BENCHMARKS if which == "all" else [which]:
        if name == "encoder":
            rows = encoder_benchmark(shape, window, batch, device, dtype, tokens, adapter, compile_decode)
            title, header = ENCODER_TITLE, ENCODER_HEADER
        else:
            run, title, header, columns, xlabel = specs[name]
            rows = run(shape, lengths or DEFAULT_LENGTHS[name], window, batch, device, dtype)
            if out is not None:
                plots.append(plot_lengths(rows, columns, out / f"{name}.png",
                                          f"{title.split(':')[0]}, batch {batch}, W={window} ({shape}, {device})",
                                          xlabel))
        note = {"grpo": GRPO_NOTE, "eviction": EVICTION_NOTE}.get(name)
        table = markdown_table(header, rows) + (f"\n\n{note}" if note else "")
        print(f"\n{title}\n{table}", flush=True)
        tables[name] = rows
        records[name] = {"title": title, "header": header, "rows": rows}
        sections += [f"### {title}", "", table, ""]
    sections += [f"![{p.stem}]({p.name})" for p in plots]
    markdown = "\n".join(sections).rstrip() + "\n"
    if out is not None:
        (out / "bench.md").write_text(markdown)
        (out / "bench.json").write_text(json.dumps({"settings": settings, "tables": records}, indent=1) + "\n")
    return {"tables": tables, "plots": plots, "markdown": markdown}
