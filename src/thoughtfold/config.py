"""Every setting as plain data, validated once: the engine's (`CacheConfig`, `AdapterConfig`,
`SamplingConfig`), the run's (`TrainConfig` with its `DataConfig`) and the choice lists they accept.
Each entry point (library, trainers, CLI) reports a bad setting with the same one-line message.

Nothing here imports torch or transformers, so reading settings is instant; the YAML form of a
`TrainConfig` (`load_config`, `config_to_yaml`) is config_files.py's. Field names of `TrainConfig`
are TRL's GRPOConfig names where TRL has the setting; TRL's other names translate (trl_names.py) in
Python, YAML and overrides alike, and `GRPOConfig` / `SFTConfig` spell the class as TRL does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace

from .checks import SEED_LIMIT, SIZE_LIMIT, WINDOW_LIMIT, check_field_types, check_int
from .errors import ConfigError
from .settings_help import default_settings, describe_fields
from .trl_names import accept_trl_names, report_backends, settings_object

ADAPTER_MODES = ("none", "lora", "pte")
STATE_UPDATES = ("exact", "paper")
EVICTIONS = ("oldest", "h2o", "snapkv", "headkv")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LOSS_TYPES = ("grpo", "bnpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
_SCALE_FLAGS = {"true": "group", "false": "none"}  # TRL's boolean scale_rewards
LR_SCHEDULERS = ("constant", "linear", "cosine")
SFT_TARGETS = ("dataset", "full_cache")
SFT_LOSSES = ("nll", "kl")
DISTILL_TOKENS = ("after_eviction", "all")
ZERO_STD_NORMS = ("kept", "batch")
BACKPROP = ("state", "truncated", "full")
"""How replay gradients cross eviction events, the default first:

* ``state``: the exact gradient through the chain of encoder states (the loss of a late token reaches
  the encoding of every evicted block), cached K/V detached, backward per segment: the memory of
  ``truncated`` plus the evicted K/V. What PTE needs to learn to use what it evicted.
* ``truncated``: every state is detached at the next event, so a segment's loss reaches the encoder
  only through the block evicted just before it. It cannot learn recall across evictions.
* ``full``: one graph over all segments (states and cached K/V): exact, memory grows with length.
"""


def check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    """A ConfigError naming the setting and its choices unless `value` is one of `allowed`."""
    if not isinstance(value, str) or value not in allowed:
        raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")


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
        check_field_types(self)  # the types first: the checks below compare numbers
        if self.window is not None and not 1 <= self.window < WINDOW_LIMIT:
            raise ConfigError(f"window must be >= 1 (or None: a full cache) and < 2**24, got {self.window}")
        if not 0.0 < self.evict_ratio <= 1.0:
            raise ConfigError(f"evict_ratio must be in (0, 1], got {self.evict_ratio!r}")
        self.evict_ratio = float(self.evict_ratio)
        check_choice("eviction", self.eviction, EVICTIONS)
        if self.window is None and self.eviction != "oldest":
            raise ConfigError(f"eviction {self.eviction!r} chooses which tokens leave a bounded cache, but "
                              "a full cache (window None) evicts none: set a window or eviction oldest")
        observe = self.observe_window
        if observe is not None and not 1 <= observe <= (self.window or 0):
            raise ConfigError(f"observe_window must be an integer >= 1 and at most the window "
                              f"({self.window}), or None (automatic), got {observe}")

    def with_window(self, window: int | None) -> CacheConfig:
        """These settings under another window: a full cache (None) evicts nothing, so the eviction
        policy and its observation window fall back to their defaults there; a smaller window
        observes at most its own size of queries."""
        if window is None:
            return replace(self, window=None, eviction="oldest", observe_window=None)
        observe = self.observe_window
        return replace(self, window=window, observe_window=None if observe is None else min(observe, window))

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

    `residual` (pte only) chooses the update: the paper's B S_l A (the default), or B (I + S_l) A,
    LoRA_c's B A plus the state's contribution (PTE starts as a static LoRA). The residual form learned
    faster at small budgets but diverged at the replication's full budget under its tightest window,
    where the paper's form reached full-cache accuracy (docs/real_model.md)."""

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
        check_field_types(self)
        check_choice("adapter mode", self.mode, ADAPTER_MODES)
        check_choice("state_update", self.state_update, STATE_UPDATES)
        check_int("adapter rank", self.rank, 1, SIZE_LIMIT)
        check_int("global_tokens", self.global_tokens, 0, SIZE_LIMIT)
        check_int("encoder_dim", self.encoder_dim, 1, SIZE_LIMIT, optional=True)
        if not math.isfinite(self.alpha) or not 0 < abs(self.alpha) <= 1e6:
            raise ConfigError(f"adapter alpha must be a finite number, non-zero and at most 1e6 in size, "
                              f"got {self.alpha}")
        targets = self.target_modules
        if isinstance(targets, str) or not all(isinstance(m, str) and m for m in targets):
            raise ConfigError(f"target_modules must be a list of linear names, got {targets!r:.80}")
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


@dataclass
class SamplingConfig:
    """How a rollout samples: `max_new_tokens` per sequence, `temperature` (0 = greedy), nucleus
    `top_p` and `top_k` (0 = off) truncation, and the `seed` of the sequences' random streams (each
    sequence's is a function of the seed and its index; None: a seed from the global RNG). The field
    names are `Policy.generate`'s keywords."""

    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not self.temperature >= 0 or math.isinf(self.temperature):  # also NaN
            raise ConfigError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        check_int("seed", self.seed, 0, SEED_LIMIT, optional=True)

    def to_dict(self) -> dict:
        """The keyword arguments of `Policy.generate` this config stands for."""
        return asdict(self)


@dataclass
class DataConfig:
    """Where prompts come from (any spec `tasks.data.load_dataset_by_name` accepts) and how they are
    templated. `completion_field` is the column holding the target trace for SFT. The defaults are
    the quickstart task (one-step arithmetic, no system prompt: a 135M model answers best directly);
    math sets want `system_prompt` = `tasks.example.SYSTEM_PROMPT`, which asks for a \\boxed{} answer."""

    dataset: str = "arith:tiny"
    split: str | None = None
    limit: int | None = None
    prompt_field: str | None = None
    answer_field: str | None = None
    completion_field: str = "solution"
    system_prompt: str | None = None
    chat_template: bool = True
    shuffle: bool = True


@dataclass
class TrainConfig:
    """Everything a GRPO or SFT run needs. Names are TRL's GRPOConfig names where TRL has the setting
    (`num_generations`, `learning_rate`, `max_steps`, `epsilon`, `loss_type`, ...); the rest are PTE's
    or ours (`prompts_per_step`, `backprop`, `generation_batch_size`, ...). TRL's other names are
    taken too: mapped, translated (`per_device_train_batch_size` x `gradient_accumulation_steps` ->
    prompts per step) or refused with what to use instead. `cache`, `adapter` and `data` may be given
    as dicts. The defaults are the quickstart run (configs/quickstart.yaml): PTE on the bundled small
    model."""

    trainer = "grpo"  # whose batch TRL's batch sizes count (SFTConfig: "sft"); not a setting

    model: str = "default"
    dtype: str | None = None
    device: str | None = None
    compile_decode: bool = False
    fsdp: bool = False
    cache: CacheConfig = field(default_factory=lambda: CacheConfig(window=4))
    adapter: AdapterConfig = field(
        default_factory=lambda: AdapterConfig(mode="pte", rank=8, alpha=16.0, global_tokens=8)
    )
    data: DataConfig = field(default_factory=DataConfig)
    rewards: list[str] = field(default_factory=lambda: ["arith"])
    reward_weights: list[float] | None = None
    reward_timeout: float | None = 300.0  # seconds one reward call may take; a slower one ends the run
    num_generations: int = 8
    prompts_per_step: int = 4
    max_completion_length: int = 24
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    learning_rate: float = 1e-3
    encoder_lr_ratio: float = 1.0
    weight_decay: float = 0.0
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 1
    warmup_ratio: float | None = None
    max_grad_norm: float = 1.0
    loss_type: str = "dapo"
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    scale_rewards: str = "group"
    filter_zero_std: bool = True
    zero_std_norm: str = "kept"
    mask_truncated_completions: bool = False
    num_iterations: int = 1
    sft_targets: str = "dataset"
    sft_loss: str = "nll"
    distill_tokens: str = "after_eviction"
    distill_top_k: int | None = 256
    backprop: str = "state"
    generation_batch_size: int | None = None
    replay_batch_size: int | None = None
    # GiB of activations and logits one replay micro-batch holds (rows chosen to fit); null: no limit
    replay_memory_gb: float | None = 0.25
    max_steps: int = 16
    num_train_epochs: float | None = None
    save_steps: int = 8
    logging_steps: int = 1
    eval_steps: int | None = None
    log_completions: bool = False
    num_completions_to_print: int | None = 4
    save_total_limit: int | None = 2
    output_dir: str = "runs/quickstart"
    overwrite_output_dir: bool = False
    resume: bool = False
    seed: int = 0
    report_to: list[str] = field(default_factory=list)
    progress: bool = True

    def __post_init__(self) -> None:
        self.cache = settings_object(CacheConfig, self.cache, "cache")
        self.adapter = settings_object(AdapterConfig, self.adapter, "adapter")
        self.data = settings_object(DataConfig, self.data, "data")
        check_field_types(self.data)
        self.scale_rewards = _SCALE_FLAGS.get(str(self.scale_rewards).lower(), self.scale_rewards)
        if self.epsilon_high is None:  # TRL's default: the same bound on both sides
            self.epsilon_high = self.epsilon
        if self.max_steps == -1:  # TRL's "train num_train_epochs epochs" (its default: 3)
            self.max_steps, self.num_train_epochs = 1, self.num_train_epochs or 3.0
        if isinstance(self.report_to, str):  # TRL takes one name as well as a list
            self.report_to = [self.report_to]
        check_field_types(self)
        self.report_to = report_backends(self.report_to)
        self._check_choices()
        self._check_ranges()

    def _check_choices(self) -> None:
        for name, allowed in (("loss_type", LOSS_TYPES), ("scale_rewards", SCALE_REWARDS),
                              ("lr_scheduler_type", LR_SCHEDULERS), ("sft_targets", SFT_TARGETS),
                              ("backprop", BACKPROP), ("zero_std_norm", ZERO_STD_NORMS),
                              ("sft_loss", SFT_LOSSES), ("distill_tokens", DISTILL_TOKENS)):
            check_choice(name, getattr(self, name), allowed)

    def _check_ranges(self) -> None:
        # NaN passes every comparison below (nan <= 0 is False): refuse non-finite numbers first
        for name, value in [(f.name, getattr(self, f.name)) for f in fields(self)] + [
                ("reward_weights", w) for w in self.reward_weights or []]:
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
        for name, low in (("num_generations", 1), ("prompts_per_step", 1), ("num_iterations", 1),
                          ("max_steps", 1), ("warmup_steps", 0), ("save_steps", 0), ("logging_steps", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError("temperature must be > 0 for training (log-probs need a distribution), "
                              f"got {self.temperature}")
        if self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        self.sampling()  # top_p, top_k
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.encoder_lr_ratio <= 0:
            raise ConfigError(f"encoder_lr_ratio must be > 0, got {self.encoder_lr_ratio}")
        full_cache = isinstance(self.cache, CacheConfig) and not self.cache.bounded
        if self.sft_loss == "kl" and self.distill_tokens == "after_eviction" and full_cache:
            raise ConfigError("sft_loss=kl with distill_tokens=after_eviction needs a bounded cache (a full "
                              "cache never evicts): set cache.window or distill_tokens=all")
        check_int("seed", self.seed, 0, SEED_LIMIT)
        if self.reward_timeout is not None and self.reward_timeout <= 0:
            raise ConfigError(f"reward_timeout must be > 0 (seconds) or null, got {self.reward_timeout}")
        if self.epsilon < 0 or self.epsilon_high < 0:
            raise ConfigError("epsilon and epsilon_high must be >= 0")
        if self.replay_memory_gb is not None and self.replay_memory_gb <= 0:
            raise ConfigError(f"replay_memory_gb must be > 0 or null (no limit), got {self.replay_memory_gb}")
        for name in ("num_train_epochs", "warmup_ratio"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0 or null, got {getattr(self, name)}")
        for name in ("generation_batch_size", "replay_batch_size", "save_total_limit", "distill_top_k",
                     "eval_steps", "num_completions_to_print"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 or null, got {getattr(self, name)}")

    def sampling(self, seed: int | None = None) -> SamplingConfig:
        """How the rollouts sample (`max_completion_length` new tokens, the temperature and the
        truncation settings), with `seed`."""
        return SamplingConfig(self.max_completion_length, self.temperature, self.top_p, self.top_k, seed)

    def for_dataset(self, rows: int, processes: int = 1) -> TrainConfig:
        """This config with `num_train_epochs` and `warmup_ratio` turned into `max_steps` and
        `warmup_steps` for a dataset of `rows` rows (each step draws prompts_per_step x processes)."""
        steps = self.max_steps
        if self.num_train_epochs is not None:
            steps = max(1, math.ceil(self.num_train_epochs * rows / (self.prompts_per_step * processes)))
        warmup = self.warmup_steps if self.warmup_ratio is None else math.ceil(self.warmup_ratio * steps)
        return replace(self, max_steps=steps, warmup_steps=warmup, num_train_epochs=None, warmup_ratio=None)


class GRPOConfig(TrainConfig):
    """TrainConfig spelled as TRL's GRPOConfig (the same settings; TRL's batch sizes count completions)."""


class SFTConfig(TrainConfig):
    """TrainConfig spelled as TRL's SFTConfig: TRL's batch sizes count traces, `max_length` caps
    them (max_completion_length) and `loss_type` is SFT's (sft_loss)."""

    trainer = "sft"


accept_trl_names(TrainConfig)  # TrainConfig(per_device_train_batch_size=8, ...) translates
TrainConfig.__doc__ += describe_fields(default_settings(TrainConfig()))
