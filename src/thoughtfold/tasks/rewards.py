"""Reward functions with TRL's signature: ``fn(prompts, completions, **columns) -> list[float | None]``.

* :func:`math_reward` -- 1.0 when the completion's final answer equals the gold answer according to
  ``math-verify`` (fractions, decimals, LaTeX, sets, equations ...), else 0.0; ``None`` when the gold
  answer itself cannot be parsed (the caller skips the sample and counts it). Graded in killable
  worker processes (``grading.py``).
* :func:`format_reward` -- 1.0 for exactly one final ``\\boxed{}`` answer (and a closed ``<think>``).
* the tasks' own rewards: ``arith`` (``arith.py``) and ``recall`` (``recall.py``).
* :func:`load_reward` -- a built-in by name, or a user function by dotted path / file path.
* :func:`score_completions` -- one call of a reward the TRL way, under a time limit; a reward that
  raises, hangs or returns unusable scores ends in one RewardError naming it.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ..errors import ConfigError, RewardError
from .answers import boxed_spans, completion_text, extract_answer, final_section, gold_answers
from .arith import arith_reward
from .grading import DEFAULT_TIMEOUT_S, MathGrader, default_grader
from .recall import recall_reward

RewardFn = Callable[..., list]
GOLD_COLUMNS = (("answer", "solution"),)  # what the math rewards read: one of these columns
ERROR_LOG = "errors.log"  # where a run keeps the traceback of a reward that failed
_TIMEOUT_SIGNAL = signal.SIGUSR2  # the signal that interrupts a reward past its time limit


# --------------------------------------------------------------------------- reward functions


def make_math_reward(timeout_s: float = DEFAULT_TIMEOUT_S, num_workers: int | None = None) -> RewardFn:
    """A :func:`math_reward` with its own grader (per-item timeout, worker count)."""
    grader = MathGrader(timeout_s=timeout_s, num_workers=num_workers)

    def math_reward(prompts: Sequence[Any] | None, completions: Sequence[Any],
                    answer: Sequence[Any] | None = None, solution: Sequence[Any] | None = None,
                    **columns: Any) -> list[float | None]:
        return _math_reward(grader, completions, answer, solution)

    math_reward.grader = grader  # type: ignore[attr-defined]
    math_reward.columns = GOLD_COLUMNS  # type: ignore[attr-defined]
    return math_reward


def _math_reward(grader: MathGrader, completions: Sequence[Any], answer: Sequence[Any] | None,
                 solution: Sequence[Any] | None) -> list[float | None]:
    golds = gold_answers(answer, len(completions), "math_reward", solution)
    preds = [extract_answer(c) for c in completions]
    todo = [i for i, g in enumerate(golds) if g is not None]
    scores = grader.grade([(preds[i], golds[i]) for i in todo])  # type: ignore[misc]
    results: list[float | None] = [None] * len(completions)
    for i, score in zip(todo, scores, strict=True):
        results[i] = score
    return results


def math_reward(prompts: Sequence[Any] | None, completions: Sequence[Any],
                answer: Sequence[Any] | None = None, solution: Sequence[Any] | None = None,
                **columns: Any) -> list[float | None]:
    """1.0 if the completion's final answer (last ``\\boxed{}`` after ``</think>``, else the stated /
    last answer) is equivalent to the gold ``answer`` (else TRL's ``solution``: its last box or its
    text) per math-verify, else 0.0; None where the gold cannot be parsed. Each item has a hard
    timeout (:data:`DEFAULT_TIMEOUT_S`) scoring 0.0."""
    return _math_reward(default_grader(), completions, answer, solution)


math_reward.columns = GOLD_COLUMNS  # type: ignore[attr-defined]


def format_reward(prompts: Sequence[Any] | None, completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 if the completion ends its reasoning (a ``<think>`` is closed) and gives exactly one
    non-empty ``\\boxed{}`` answer after it, else 0.0."""
    scores = []
    for completion in completions:
        text = final_section(completion_text(completion))
        boxes = boxed_spans(text) if text is not None else []
        scores.append(1.0 if len(boxes) == 1 and text[slice(*boxes[0])].strip() else 0.0)
    return scores


def score_completions(name: str, fn: RewardFn, prompts: list, completions: list, completion_ids: list | None,
                      examples: Sequence[dict], repeat: int = 1,
                      timeout: float | None = None) -> list[float | None]:
    """`fn`'s checked scores, called the TRL way: prompts, completions, completion_ids and every
    dataset column but the prompt as a keyword list aligned with the completions (each example
    stands for `repeat` consecutive completions: a GRPO group). A reward that raises (SystemExit
    included) or runs past `timeout` seconds is a RewardError naming it."""
    keys = sorted({k for e in examples for k in e if k != "prompt"})
    columns = {k: [e.get(k) for e in examples for _ in range(repeat)] for k in keys}
    try:
        with time_limit(timeout):
            scores = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    except KeyboardInterrupt:
        raise
    except _TimeUp:
        raise RewardError(f"reward {name} did not return within {timeout:g} s: make it faster, or raise "
                          "reward_timeout (--reward-timeout)") from None
    except BaseException as e:  # a reward's sys.exit(0) must not end the run as a success
        message = " ".join(str(e).split())[:200]
        raise RewardError(f"reward {name} raised {type(e).__name__}{': ' + message if message else ''}",
                          traceback.format_exc()) from None
    return checked_scores(name, scores, len(completions))


class _TimeUp(BaseException):
    """Raised inside a reward that ran out of time (a BaseException: `except Exception` in the
    reward's own code does not swallow it)."""


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Interrupt the block with _TimeUp after `seconds`: a timer thread sends the main thread a
    signal, which also wakes a sleep or a blocking read (C code that never returns to Python cannot
    be interrupted). Without a limit, or outside the main thread (no signals there), no limit."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    armed = True

    def interrupt(signum: int, frame: Any) -> None:
        if armed:
            raise _TimeUp

    previous = signal.signal(_TIMEOUT_SIGNAL, interrupt)
    timer = threading.Timer(seconds, signal.pthread_kill, (threading.main_thread().ident, _TIMEOUT_SIGNAL))
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        armed = False
        timer.cancel()
        timer.join()
        signal.signal(_TIMEOUT_SIGNAL, previous)


def checked_scores(name: str, scores: Any, n: int) -> list[float | None]:
    """A reward function's output as floats (None = skipped; NaN counts as None), or a one-line
    RewardError: a reward that returns strings, infinities or the wrong count is a bug in that
    function, not in the run."""
    if not isinstance(scores, Sequence) or isinstance(scores, (str, bytes)):
        raise RewardError(f"reward {name} returned {type(scores).__name__}, not a list of {n} scores")
    if len(scores) != n:
        raise RewardError(f"reward {name} returned {len(scores)} scores for {n} completions")
    values = [None if s is None else _score_value(name, s) for s in scores]
    return [None if v is None or math.isnan(v) else v for v in values]


def _score_value(name: str, score: Any) -> float:
    try:
        if isinstance(score, (str, bytes)):
            raise TypeError
        value = float(score)  # also numpy scalars and one-element tensors
    except (TypeError, ValueError, OverflowError):
        raise RewardError(f"reward {name} returned {score!r:.60} ({type(score).__name__}); "
                          "scores must be numbers or None") from None
    if abs(value) >= 1e38:  # infinite, or beyond float32 where the rewards are summed
        raise RewardError(f"reward {name} returned {value}: scores must be finite numbers below 1e38 in size "
                          "(None or NaN skips a completion)")
    return value


def keep_traceback(error: RewardError, directory: str | Path) -> RewardError:
    """`error` with its traceback appended to `directory`/errors.log and the message pointing there
    (the command line shows one line; the log keeps the rest)."""
    if not error.details:
        return error
    path = Path(directory) / ERROR_LOG
    try:
        with path.open("a", encoding="utf-8") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {error}\n{error.details}\n")
    except OSError:
        return error
    return RewardError(f"{error} (traceback in {path})", error.details)


# --------------------------------------------------------------------------- the columns a reward reads

TRL_REWARD_ARGUMENTS = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra",
                        "log_metric"}  # what a trainer passes besides the dataset's columns


def reward_columns(fn: RewardFn) -> list[tuple[str, ...]]:
    """The dataset columns `fn` reads, each as a tuple of names any one of which serves: a built-in
    reward's declaration (its `columns`), else the parameters of its signature without a default
    that are not TRL's own arguments (`def reward(completions, solution, **kwargs)` reads solution)."""
    declared = getattr(fn, "columns", None)
    if declared is not None:
        return [tuple(c) for c in declared]
    try:
        parameters = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [(p.name,) for p in parameters
            if p.default is p.empty and p.kind in named and p.name not in TRL_REWARD_ARGUMENTS]


def check_reward_columns(name: str, fn: RewardFn, rows: Sequence[dict], where: str) -> None:
    """A one-line ConfigError unless `rows` (the dataset) have every column `fn` reads: found before
    the first rollout rather than after it."""
    present = {k for row in rows for k in row}
    for options in reward_columns(fn):
        if not present & set(options):
            wanted = " or ".join(repr(o) for o in options)
            raise ConfigError(f"reward {name} reads the {wanted} column, but the rows of {where} have "
                              f"{', '.join(sorted(present))}: add it (or rename a column to it)")


# --------------------------------------------------------------------------- lookup by name

BUILTIN_REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "accuracy": math_reward,
    "format": format_reward,
    "arith": arith_reward,
    "recall": recall_reward,
}


def load_reward(spec: str | Callable) -> RewardFn:
    """A reward function from a built-in name (``math``, ``accuracy``, ``format``, ``arith``,
    ``recall``), a dotted path (``pkg.module:function`` or ``pkg.module.function``) or a file
    (``path/to/file.py:function``)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in BUILTIN_REWARDS:
        return BUILTIN_REWARDS[spec]
    if ":" in spec:
        module_name, _, attr = spec.rpartition(":")
    elif "." in spec:
        module_name, _, attr = spec.rpartition(".")
    else:
        raise ConfigError(
            f"unknown reward {spec!r}: use one of {sorted(BUILTIN_REWARDS)} or a dotted path "
            "'pkg.module:function'"
        )
    module = _import_reward_module(spec, module_name)
    fn = getattr(module, attr, None)
    if fn is None:
        raise ConfigError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ConfigError(f"reward {spec!r}: {attr!r} is not callable")
    return fn


def _import_reward_module(spec: str, module_name: str):
    """Import ``module_name``, which may also be a path to a ``.py`` file."""
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"reward {spec!r}: file {module_name} not found")
        file_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(file_spec)
        try:
            file_spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"reward {spec!r}: importing {module_name} failed "
                              f"({type(e).__name__}: {e})") from e
        return module
    try:
        return importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(
            f"reward {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e})"
        ) from e
