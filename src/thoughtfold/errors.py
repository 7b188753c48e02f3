"""Typed exceptions: every user mistake becomes one of these, with a one-line message that names
the problem and the fix. The CLI prints them without a traceback."""


import errno

STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG,
                            errno.EIO})
"""What a refused write reports: a full disk or quota, a read-only disk, no permission, an I/O error."""


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


class CorruptFileError(ConfigError):
    """A saved file that cannot be what it claims to be (truncated, garbled, NaN weights): unlike a
    settings conflict, a resume skips it for the checkpoint before."""


class RewardError(ConfigError):
    """A reward function that raised, ran past its time limit or returned unusable scores. Its
    traceback, when there is one, is in `details` (the trainers write it to the run's error log)."""

    def __init__(self, message: str, details: str | None = None):
        super().__init__(message)
        self.details = details


class StorageError(ThoughtfoldError, OSError):
    """A write that the disk refused (full, read-only, no permission)."""
