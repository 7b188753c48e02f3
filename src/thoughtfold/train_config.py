"""The run's settings: `TrainConfig` (with its `DataConfig`) and their YAML form. Kept apart from
config.py's engine configs because these pull in the loss and replay choices (torch), while config.py
stays importable at `import thoughtfold` time. Field names are TRL's GRPOConfig names where TRL has
the setting; the names earlier versions used (LEGACY_NAMES) still load, so saved run configs resume.

Configs load from YAML plus ``key=value`` overrides through OmegaConf.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .config import AdapterConfig, CacheConfig
from .engine.replay import BACKPROP
from .errors import ConfigError
from .training.losses import LOSS_TYPES, SCALE_REWARDS

LR_SCHEDULERS = ("constant", "linear", "cosine")
SFT_TARGETS = ("dataset", "full_cache")
REPORT_TO = ("tensorboard", "wandb")
ZERO_STD_NORMS = ("kept", "batch")



@dataclass
class DataConfig:
    """Where prompts come from (any spec `data.load_dataset_by_name` accepts) and how they are
    templated. `completion_field` is the column holding the target trace for SFT. The defaults are
    the quickstart task (one-step arithmetic, no system prompt: a 135M model answers best directly);
    math sets want `system_prompt` = `data.SYSTEM_PROMPT`, which asks for a \\boxed{} answer."""

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
    or ours (`prompts_per_step`, `backprop`, `generation_batch_size`, ...). The defaults are the
    quickstart run (configs/quickstart.yaml): PTE on the bundled small model."""

    model: str = "default"
    dtype: str | None = None
    device: str | None = None
    compile_decode: bool = False  # torch.compile the rollouts' decode step (worth it on CUDA)
    fsdp: bool = False  # under torchrun: also shard the frozen base weights over the processes (FSDP2)
    cache: CacheConfig = field(default_factory=lambda: CacheConfig(window=16))
    adapter: AdapterConfig = field(
        default_factory=lambda: AdapterConfig(mode="pte", rank=8, alpha=16.0, global_tokens=8)
    )
    data: DataConfig = field(default_factory=DataConfig)
    rewards: list[str] = field(default_factory=lambda: ["arith"])  # GRPO's, unless GRPOTrainer gets reward_funcs
    reward_weights: list[float] | None = None
    num_generations: int = 8
    prompts_per_step: int = 4
    max_completion_length: int = 24
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 1
    max_grad_norm: float = 1.0
    loss_type: str = "dapo"
    epsilon: float = 0.2  # the low clip bound (TRL's name); epsilon_high is the high one
    epsilon_high: float = 0.2
    beta: float = 0.0
    scale_rewards: str = "group"
    filter_zero_std: bool = True
    zero_std_norm: str = "kept"  # with filter_zero_std: normalise over the "kept" rows, or the "batch" (TRL)
    mask_truncated_completions: bool = False
    num_iterations: int = 1
    sft_targets: str = "dataset"
    backprop: str = "state"  # how replay gradients cross evictions (replay.BACKPROP); "truncated" cannot learn recall
    generation_batch_size: int | None = None
    replay_batch_size: int | None = None
    max_steps: int = 16
    save_steps: int = 8
    logging_steps: int = 1  # metrics line and progress postfix every N steps (means over them)
    save_total_limit: int | None = 2
    output_dir: str = "runs/quickstart"
    overwrite_output_dir: bool = False
    resume: bool = False
    seed: int = 0
    report_to: list[str] = field(default_factory=list)
    progress: bool = True

    def __post_init__(self) -> None:
        self._check_choices()
        self._check_ranges()

    def _check_choices(self) -> None:
        for name, value, allowed in (("loss_type", self.loss_type, LOSS_TYPES),
                                     ("scale_rewards", self.scale_rewards, SCALE_REWARDS),
                                     ("lr_scheduler_type", self.lr_scheduler_type, LR_SCHEDULERS),
                                     ("sft_targets", self.sft_targets, SFT_TARGETS),
                                     ("backprop", self.backprop, BACKPROP),
                                     ("zero_std_norm", self.zero_std_norm, ZERO_STD_NORMS)):
            if value not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
        unknown = [r for r in self.report_to if r not in REPORT_TO]
        if unknown:
            raise ConfigError(f"report_to accepts {', '.join(REPORT_TO)}, got {unknown[0]!r}")

    def _check_ranges(self) -> None:
        # NaN passes every comparison below (nan <= 0 is False): refuse non-finite numbers first
        for name, value in [(f.name, getattr(self, f.name)) for f in fields(self)] + [
                ("reward_weights", w) for w in self.reward_weights or []]:
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"{name} must be a finite number, got {value}")
        for name, low in (("num_generations", 1), ("prompts_per_step", 1), ("max_completion_length", 1),
                          ("num_iterations", 1), ("max_steps", 1), ("warmup_steps", 0), ("save_steps", 0),
                          ("logging_steps", 1)):
            if getattr(self, name) < low:
                raise ConfigError(f"{name} must be >= {low}, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 for training (log-probs need a distribution), got {self.temperature}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.epsilon < 0 or self.epsilon_high < 0:
            raise ConfigError("epsilon and epsilon_high must be >= 0")
        for name in ("generation_batch_size", "replay_batch_size", "save_total_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 or null, got {getattr(self, name)}")


LEGACY_NAMES = {
    "group_size": "num_generations",
    "max_new_tokens": "max_completion_length",
    "lr": "learning_rate",
    "steps": "max_steps",
    "save_every": "save_steps",
    "lr_scheduler": "lr_scheduler_type",
    "epsilon_low": "epsilon",
}
"""Names earlier versions gave TrainConfig fields (old -> current): configs written by them, such as
a run's saved config.yaml that a resume reloads, still load."""


def _with_current_names(layer: DictConfig, source: str) -> DictConfig:
    """`layer` with legacy names renamed to the current ones; an unknown top-level key is a
    ConfigError that suggests the closest known name."""
    known = {f.name for f in fields(TrainConfig)}
    out, spelled = {}, {}
    for key in layer:
        name = LEGACY_NAMES.get(str(key), str(key))
        if name not in known:
            close = difflib.get_close_matches(str(key), sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown setting {key!r}{hint}")
        if name in out:
            raise ConfigError(f"{source}: {spelled[name]!r} and {key!r} set the same thing; keep one")
        out[name], spelled[name] = layer[key], key
    return OmegaConf.create(out)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> TrainConfig:
    """A TrainConfig from defaults < YAML file < ``key=value`` overrides (dotted keys, e.g.
    ``cache.window=256 adapter.mode=lora``); the legacy names in LEGACY_NAMES (`lr`, `steps`, ...)
    work too. Unknown keys and bad types raise ConfigError."""
    layers = [OmegaConf.structured(TrainConfig)]
    try:
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} not found")
            loaded = OmegaConf.load(path)
            if not isinstance(loaded, DictConfig):
                raise ConfigError(f"config file {path} must be a mapping of settings (key: value), "
                                  f"not a {type(loaded).__name__.removesuffix('Config').lower()}")
            layers.append(_with_current_names(loaded, f"config file {path}"))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} must look like key=value (e.g. learning_rate=1e-5)")
        layers.append(_with_current_names(OmegaConf.from_dotlist(list(overrides)), "override"))
        return OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None)
        message = str(e).splitlines()[0]
        raise ConfigError(f"config{f' key {key!r}' if key else ''}: {message}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None


def config_to_yaml(config: TrainConfig) -> str:
    """The resolved config, as saved next to the run (reload it with `load_config`)."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


__all__ = ["LEGACY_NAMES", "DataConfig", "TrainConfig", "config_to_yaml", "load_config"]
