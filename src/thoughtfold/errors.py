"""Typed exceptions: every user mistake becomes one of these, with a one-line message that names
the problem and the fix. The CLI prints them without a traceback."""


class ThoughtfoldError(Exception):
    """Base class of all errors thoughtfold raises on bad input."""


class ConfigError(ThoughtfoldError, ValueError):
    """An invalid setting (window < 1, evict_ratio outside (0, 1], unknown mode, ...)."""


class ModelLoadError(ThoughtfoldError, OSError):
    """A model path or hub id that cannot be loaded."""


class UnsupportedArchitectureError(ThoughtfoldError, ValueError):
    """A model family the engine has not been validated on."""


class PromptTooLongError(ThoughtfoldError, ValueError):
    """A prompt (plus the tokens to generate) exceeds the model's maximum positions."""


class DataError(ThoughtfoldError, ValueError):
    """A malformed data file (bad JSON on line N, missing field, ...)."""
