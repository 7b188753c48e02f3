"""Measuring a call: wall-clock time with the device's work included, peak memory (CUDA allocator
statistics, or on a CPU the tensor-counting probe in memory.py, in an untimed second run), the
card's copy bandwidth, and the random-init models the benchmarks run on (nothing is downloaded)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch

from .config import SHAPES
from .memory import PeakMemory


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


def random_prompts(shape: str, batch: int, length: int = 32, seed: int = 0) -> list[list[int]]:
    """`batch` random token-id prompts of `length` tokens (id 0 is the padding id)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(1, SHAPES[shape]["vocab_size"], (batch, length), generator=generator).tolist()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seconds(fn: Callable[[], object], device: str) -> float:
    """Wall-clock seconds of `fn`, device work included."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def measure(fn: Callable[[], object], device: str) -> tuple[float, int, int | None]:
    """(seconds, peak bytes allocated inside `fn`, on CUDA the allocator's peak including what was
    allocated before). On CUDA one run gives all three (the allocator keeps statistics); on CPU the
    memory tracker slows every op, so memory comes from a second, untimed run. Callers warm up first."""
    if device.startswith("cuda"):
        with PeakMemory(device) as mem:
            took = seconds(fn, device)
        return took, mem.peak_bytes, mem.total_peak_bytes
    took = seconds(fn, device)
    with PeakMemory(device) as mem:
        fn()
    return took, mem.peak_bytes, None


def copy_bandwidth(device: str, gib: float = 2.0) -> float:
    """Measured device-memory bandwidth in bytes/s: a large copy reads and writes every byte."""
    n = int(gib * 2**30) // 2
    a = torch.empty(n, dtype=torch.bfloat16, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    took = seconds(lambda: [b.copy_(a) for _ in range(10)], device)
    return 10 * 2 * a.numel() * a.element_size() / took


def describe_device(device: str) -> str:
    """The device as a results table names it: the card, or the CPU threads used."""
    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"


def progress(line: str) -> None:
    """One progress line per measurement, on stderr (the tables go to stdout)."""
    print(f"  {line}", file=sys.stderr, flush=True)
