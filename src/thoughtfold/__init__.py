"""thoughtfold: reasoning LMs under a fixed-size KV cache with Progressive Thought Encoding.

The settings and errors import eagerly (plain data: no torch, no transformers); the engine and the
trainers load on first use (`from thoughtfold import Policy, GRPOTrainer`), so `import thoughtfold`
stays fast."""

from importlib import import_module
from typing import Any

from .config import (
    AdapterConfig,
    CacheConfig,
    DataConfig,
    GRPOConfig,
    SamplingConfig,
    SFTConfig,
    TrainConfig,
)
from .config_files import load_config
from .errors import (
    ConfigError,
    DataError,
    ModelLoadError,
    PromptTooLongError,
    ThoughtfoldError,
    UnsupportedArchitectureError,
)

_LAZY = {
    "Policy": "policy",
    "GenerationResult": "policy",
    "EvictionPolicy": "engine.eviction",
    "EvictionEvent": "engine.eviction",
    "GRPOTrainer": "training.grpo",
    "SFTTrainer": "training.sft",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'thoughtfold' has no attribute {name!r}")


__all__ = [
    "AdapterConfig",
    "CacheConfig",
    "ConfigError",
    "DataConfig",
    "DataError",
    "GRPOConfig",
    "ModelLoadError",
    "PromptTooLongError",
    "SamplingConfig",
    "SFTConfig",
    "ThoughtfoldError",
    "TrainConfig",
    "UnsupportedArchitectureError",
    "load_config",
    *_LAZY,
]
__version__ = "0.1.0"
