"""thoughtfold: reasoning LMs under a fixed-size KV cache with Progressive Thought Encoding."""

from .config import AdapterConfig, CacheConfig
from .errors import (
    ConfigError,
    DataError,
    ModelLoadError,
    PromptTooLongError,
    ThoughtfoldError,
    UnsupportedArchitectureError,
)

__all__ = [
    "AdapterConfig",
    "CacheConfig",
    "ConfigError",
    "DataError",
    "ModelLoadError",
    "PromptTooLongError",
    "ThoughtfoldError",
    "UnsupportedArchitectureError",
]
__version__ = "0.1.0"
