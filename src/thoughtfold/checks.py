"""The checks every setting, and every field read back from a file, goes through: a whole number in
a range, a flag, a number, the type a dataclass field declares. Each failure is one ConfigError
naming the field, so a bad value from Python, YAML, the command line or a saved file reads alike.
The limits keep a typo such as rank 10**12 from trying to allocate terabytes."""

from __future__ import annotations

import os
from dataclasses import fields

from .errors import ConfigError

SEED_LIMIT = 2**64  # torch's generators take seeds below 2**64
SIZE_LIMIT = 1 << 16  # rank, global tokens, encoder width, observed queries: far above any real use
WINDOW_LIMIT = 1 << 24  # the window is also checked against the model's positions when it loads


def check_int(name: str, value: object, low: int, high: int, optional: bool = False) -> None:
    """A ConfigError unless `value` is a whole number in [low, high) (or None when `optional`)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        none = " or None" if optional else ""
        top = f"2**{high.bit_length() - 1}" if high > 1024 and high & (high - 1) == 0 else high
        raise ConfigError(f"{name} must be an integer >= {low} and < {top}{none}, got {value!r:.80}")


_KINDS = {"int": ((int,), "an integer"), "float": ((int, float), "a number"),
          "bool": ((bool,), "true or false"), "str": ((str, os.PathLike), "text"),
          "list[str]": ((str,), "a list of names"),
          "list[float]": ((int, float), "a list of numbers")}


def check_field_types(settings: object) -> None:
    """A ConfigError naming the first field of the dataclass `settings` whose value is not of its
    declared type (what YAML and the command line get from OmegaConf, the Python constructors here)."""
    for f in fields(settings):
        kind, _, optional = str(f.type).partition(" | ")
        value = getattr(settings, f.name)
        if kind not in _KINDS or (value is None and optional == "None"):
            continue
        types, what = _KINDS[kind]
        if kind.startswith("list"):
            ok = isinstance(value, (list, tuple)) and all(
                isinstance(x, types) and not isinstance(x, bool) for x in value)
        else:
            ok = isinstance(value, types) and (kind == "bool" or not isinstance(value, bool))
        if not ok:
            raise ConfigError(f"{f.name} must be {what}{' or null' if optional else ''}, got {value!r:.80}")


def check_utf8(text: str, what: str, error: type[Exception] = ConfigError) -> None:
    """An `error` naming `what` unless `text` is valid Unicode: bytes that were not UTF-8 (a Latin-1
    file, a command-line argument in another encoding) reach Python as lone surrogates, which no
    tokenizer or file write accepts."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = ord(text[e.start]) - 0xDC00 if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else None
        found = f"byte {byte:#x}" if byte is not None else f"a lone surrogate {text[e.start]!a}"
        raise error(f"{what} is not valid UTF-8 text ({found} at character {e.start}); re-encode it as "
                    "UTF-8") from None


def is_token_ids(value: object) -> bool:
    """A non-empty list of whole numbers >= 0 (not booleans): a prompt or target given as token ids."""
    return isinstance(value, list) and bool(value) and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
