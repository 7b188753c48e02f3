"""What `thoughtfold bench` measures, as one validated settings object (`BenchConfig`), and the plain
data it chooses from: the model shapes, the benchmarks, the decode methods, the default lengths."""

from __future__ import annotations

from dataclasses import dataclass, field

from ...config import BACKPROP, EVICTIONS, AdapterConfig
from ...errors import ConfigError

SHAPES = {
    # a small CPU-friendly model; Qwen2.5-3B's real shape for GPU runs
    "cpu-small": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                      num_key_value_heads=2, vocab_size=4096),
    # a toy shape for smoke tests (seconds on a CPU)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936),
}
BENCHMARKS = ("decode", "replay", "grpo", "encoder", "eviction", "rollout")
DECODE_METHODS = ("bounded", "bounded-compiled", "full", "hf-static", "hf")
CPU_DECODE_METHODS = ("bounded", "full", "hf")  # compiling on a CPU adds minutes and measures little
DEFAULT_LENGTHS = {"decode": [256, 1024, 4096], "replay": [512, 2048, 8192], "grpo": [512, 1024, 2048],
                   "eviction": [1024], "rollout": [1024]}
LENGTH_MIXES = ("gsm8k", "hard")  # rollout: the completion-length mixes (bench/rollout.py states them)
DTYPES = ("float32", "bfloat16", "float16")


def _check_names(what: str, names: tuple[str, ...], allowed: tuple[str, ...]) -> None:
    unknown = [n for n in names if n not in allowed]
    if not names or unknown:
        raise ConfigError(f"unknown {what}(s) {', '.join(unknown) or 'none given'}; "
                          f"choose from {', '.join(allowed)}")


@dataclass
class BenchConfig:
    """One `thoughtfold bench` run: `which` benchmark (or "all") on a random-init model of `shape`,
    `batch` sequences, cache window `window`, at completion `lengths` (None: each benchmark's
    defaults), on `device` in `dtype` (None: float32 on CPU, bfloat16 on CUDA). `adapter` sets the
    adapters' rank and global tokens (their mode is set per row). The rest belong to one benchmark:
    decode's `baseline_max` (full-cache and HF baselines only up to that many tokens) and
    `decode_methods` (None: all on CUDA, the eager ones on CPU); the encoder's `tokens` and
    `compile_decode`; replay's and grpo's `backprops` (a PTE row each) and grpo's `replay_batch`
    (rows per replay micro-batch); eviction's `evictions` (the policies compared); rollout's `slots`
    (a comparison per number) and `mixes` (completion-length mixes; its budget is the last length)."""

    which: str = "all"
    shape: str = "cpu-small"
    lengths: list[int] | None = None
    window: int = 256
    batch: int = 4
    device: str = "cpu"
    dtype: str | None = None
    output_dir: str | None = None
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    baseline_max: int | None = None
    decode_methods: tuple[str, ...] | None = None
    tokens: int = 1024
    compile_decode: bool = False
    backprops: tuple[str, ...] = BACKPROP
    replay_batch: int | None = None
    evictions: tuple[str, ...] = EVICTIONS
    slots: tuple[int, ...] = (8, 16)
    mixes: tuple[str, ...] = LENGTH_MIXES

    def __post_init__(self) -> None:
        _check_names("benchmark", (self.which,), (*BENCHMARKS, "all"))
        if self.shape not in SHAPES:
            raise ConfigError(f"unknown shape {self.shape!r}; choose from {', '.join(sorted(SHAPES))}")
        for name in ("window", "batch", "tokens", "replay_batch", "baseline_max"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.lengths is not None and (not self.lengths or min(self.lengths) < 1):
            raise ConfigError(f"lengths must be integers >= 1, got {self.lengths}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}; use {', '.join(DTYPES)}")
        if self.decode_methods is not None:
            _check_names("decode method", self.decode_methods, DECODE_METHODS)
        _check_names("backprop mode", self.backprops, BACKPROP)
        _check_names("eviction policy", self.evictions, EVICTIONS)
        _check_names("length mix", self.mixes, LENGTH_MIXES)
        if not self.slots or min(self.slots) < 1:
            raise ConfigError(f"slots must be integers >= 1, got {list(self.slots)}")

    @property
    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def dtype_name(self) -> str:
        return self.dtype or ("bfloat16" if self.cuda else "float32")

    @property
    def methods(self) -> tuple[str, ...]:
        """The decode methods compared."""
        return self.decode_methods or (DECODE_METHODS if self.cuda else CPU_DECODE_METHODS)

    @property
    def benchmarks(self) -> tuple[str, ...]:
        return BENCHMARKS if self.which == "all" else (self.which,)

    def lengths_for(self, benchmark: str) -> list[int]:
        """The lengths `benchmark` sweeps."""
        return self.lengths or DEFAULT_LENGTHS[benchmark]

    def settings(self) -> dict:
        """The settings a run prints and records with its tables."""
        out = {"shape": self.shape, "batch": self.batch, "window": self.window, "dtype": self.dtype_name,
               "device": self.device, "rank": self.adapter.rank, "global_tokens": self.adapter.global_tokens}
        if self.replay_batch is not None:
            out["replay_batch"] = self.replay_batch
        return out
