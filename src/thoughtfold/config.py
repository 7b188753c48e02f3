"""Dataclass configs shared by the engine, the trainer and the CLI. Validation happens here, once,
so every entry point reports a bad setting with the same one-line message."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .errors import ConfigError

ADAPTER_MODES = ("none", "lora", "pte")
STATE_UPDATES = ("exact", "paper")
EVICTIONS = ("oldest", "h2o", "snapkv", "headkv")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class CacheConfig:
    """Bounded KV cache: the prompt is pinned, at most `window` thought tokens are kept, and when the
    window is full ceil(evict_ratio * window) of them are evicted in one block. `window=None` keeps
    everything (full cache).

    `eviction` chooses the block: "oldest" (the paper's sliding window, the default) or a scored
    policy choosing per sequence and per layer from the attention the tokens received: "h2o"
    (accumulated attention), "snapkv" (attention from the last `observe_window` queries) or
    "headkv" (snapkv with calibrated per-head weights). Scored policies never evict the newest
    `observe_window` thought tokens (at most W - E of them); `observe_window=None` takes
    min(32, (W - E) // 2), at least 1."""

    window: int | None = None
    evict_ratio: float = 0.25
    eviction: str = "oldest"
    observe_window: int | None = None

    def __post_init__(self) -> None:
        if self.window is not None:
            if isinstance(self.window, bool) or not isinstance(self.window, int):
                raise ConfigError(f"window must be an integer >= 1 or None (full cache), got {self.window!r}")
            if self.window < 1:
                raise ConfigError(f"window must be >= 1 (or None for a full cache), got {self.window}")
        if not isinstance(self.evict_ratio, (int, float)) or not 0.0 < float(self.evict_ratio) <= 1.0:
            raise ConfigError(f"evict_ratio must be in (0, 1], got {self.evict_ratio!r}")
        self.evict_ratio = float(self.evict_ratio)
        if self.eviction not in EVICTIONS:
            raise ConfigError(f"eviction must be one of {', '.join(EVICTIONS)}, got {self.eviction!r}")
        if self.observe_window is not None and (not isinstance(self.observe_window, int) or self.observe_window < 1):
            raise ConfigError(f"observe_window must be an integer >= 1 or None (automatic), got {self.observe_window!r}")

    @property
    def bounded(self) -> bool:
        return self.window is not None

    @property
    def evict_block(self) -> int:
        """E = ceil(rho * W): how many thought tokens one eviction event removes."""
        if self.window is None:
            raise ConfigError("a full cache (window=None) never evicts")
        # round() guards against float noise such as 0.25 * 12 = 3.0000000000000004
        return max(1, math.ceil(round(self.evict_ratio * self.window, 9)))

    @property
    def observed_queries(self) -> int:
        """How many recent decode queries a scored policy observes."""
        return self.observe_window or max(1, min(32, (self.window - self.evict_block) // 2))

    @property
    def protected(self) -> int:
        """How many of the newest thought tokens a scored policy never evicts."""
        return min(self.observed_queries, self.window - self.evict_block)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class AdapterConfig:
    """Low-rank adapter on the target linears. `none`: the base model; `lora`: static LoRA (S = I);
    `pte`: the state S_l built by the thought encoder from evicted tokens modulates the update.

    `residual` (pte only) chooses the update: A (I + S_l) B, which is LoRA_c's A B plus the state's
    contribution (so PTE starts as a static LoRA and learns the static part as fast), or the
    paper's A S_l B (`residual=False`), which has no static path."""

    mode: str = "none"
    rank: int = 32
    alpha: float = 64.0
    global_tokens: int = 32
    target_modules: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGETS)
    state_update: str = "exact"
    global_only: bool = False
    encoder_dim: int | None = None
    residual: bool = False

    def __post_init__(self) -> None:
        if self.mode not in ADAPTER_MODES:
            raise ConfigError(f"adapter mode must be one of {', '.join(ADAPTER_MODES)}, got {self.mode!r}")
        if self.state_update not in STATE_UPDATES:
            raise ConfigError(
                f"state_update must be one of {', '.join(STATE_UPDATES)}, got {self.state_update!r}"
            )
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ConfigError(f"adapter rank must be an integer >= 1, got {self.rank!r}")
        if not isinstance(self.global_tokens, int) or self.global_tokens < 0:
            raise ConfigError(f"global_tokens must be an integer >= 0, got {self.global_tokens!r}")
        if self.encoder_dim is not None and self.encoder_dim < 1:
            raise ConfigError(f"encoder_dim must be >= 1, got {self.encoder_dim}")
        if not isinstance(self.residual, bool):
            raise ConfigError(f"residual must be true or false, got {self.residual!r}")
        if not math.isfinite(self.alpha):
            raise ConfigError(f"adapter alpha must be a finite number, got {self.alpha}")
        self.target_modules = tuple(self.target_modules)
        if not self.target_modules:
            raise ConfigError("target_modules is empty: name at least one linear (e.g. q_proj)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def attention_dim(self) -> int:
        """d_a, the width of the encoder's query/key space (defaults to the rank)."""
        return self.encoder_dim or self.rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d
