"""Reward functions with TRL's signature: ``fn(prompts, completions, **columns) -> list[float | None]``.

* :func:`math_reward` -- 1.0 when the completion's final answer equals the gold answer according to
  ``math-verify`` (fractions, decimals, LaTeX, sets, equations ...), else 0.0; ``None`` when the gold
  answer itself cannot be parsed (the caller skips the sample and counts it).
* :func:`format_reward` -- 1.0 for exactly one final ``\\boxed{}`` answer (and a closed ``<think>``).
* :func:`arith_reward` -- exact number match, cheap; for the procedural arithmetic task.
* :func:`load_reward` -- a built-in by name, or a user function by dotted path / file path.

Why a subprocess pool: sympy can hang for minutes on a pathological answer (``\\boxed{9^{9^{9^{9}}}}``,
``(10^{10})!``). math-verify's own timeout uses ``signal.alarm``, which only works in the main thread
(in other threads it errors, and math-verify then silently scores 0) and cannot stop long C calls.
So grading runs in worker processes that are killed when an item exceeds its deadline: the item
scores 0.0 and the caller never stalls, whichever thread or process it runs in.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import importlib.util
import json
import os
import re
import selectors
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ThoughtfoldError
from .answers import boxed_spans, completion_text, extract_answer, final_section, last_boxed, last_number
from .recall import recall_reward

RewardFn = Callable[..., list]

DEFAULT_TIMEOUT_S = 5.0
_STARTUP_TIMEOUT_S = 120.0
_EXPONENT_RE = re.compile(r"[eE][+-]?0*(\d+)$")
MAX_EXPONENT = 10_000
_INT_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+$|^[+-]?\d+$")


def _int_literal(text: str) -> str | None:
    """``text`` in canonical form (sign, digits, no commas or leading zeros) if it is a plain integer
    literal ("1,000" allowed), else None. Compared as strings, not int(): Python refuses to parse
    integers over 4,300 digits, and a model can box one."""
    text = text.strip().strip("$").strip()
    if text.startswith("\\boxed{") and text.endswith("}"):
        text = text[len("\\boxed{"):-1].strip()
    if not _INT_RE.match(text):
        return None
    digits = text.lstrip("+-").replace(",", "").lstrip("0")
    return ("-" if text.startswith("-") and digits else "") + (digits or "0")


# --------------------------------------------------------------------------- grading (worker side)


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    """Parse a gold answer, trying ``\\boxed{gold}``, ``$gold$`` and the raw string. A gold counts as
    parsed only if math-verify finds a math expression, not just its raw-string fallback; () if not."""
    from math_verify import parse

    candidates = [gold] if "\\boxed" in gold else ["\\boxed{" + gold + "}", f"${gold}$", gold]
    for candidate in candidates:
        parsed = parse(candidate, parsing_timeout=None)
        if any(not isinstance(p, str) for p in parsed):
            return tuple(parsed)
    return ()


def grade_answer(pred: str | None, gold: str) -> float | None:
    """Grade one extracted answer against a gold string with math-verify, in this process and with
    no timeout (workers call this; the parent enforces the deadline). None = unparseable gold."""
    from math_verify import parse, verify

    gold_parsed = _parse_gold(gold.strip())
    if not gold_parsed:
        return None
    if pred is None:
        return 0.0
    pred_parsed = parse(pred, parsing_timeout=None)
    if not pred_parsed:
        return 0.0
    return 1.0 if verify(list(gold_parsed), pred_parsed, timeout_seconds=None) else 0.0


def _watch_parent(parent_pid: int) -> None:
    """Exit when the parent is gone (its pipes may stay open in a grandchild)."""
    while True:
        time.sleep(0.5)
        if os.getppid() != parent_pid:
            os._exit(0)


def _serve() -> None:
    """Worker loop: one JSON request per stdin line, one JSON reply per stdout line."""
    import logging
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    out = sys.stdout
    try:
        import math_verify  # noqa: F401

        logging.getLogger("math_verify").setLevel(logging.CRITICAL)
        grade_answer("\\boxed{1}", "1")  # warm up sympy's parser
    except Exception as e:  # reported to the parent, which raises a clear error
        out.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")
        out.flush()
        return
    out.write(json.dumps({"ready": True}) + "\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            score = grade_answer(request["pred"], request["gold"])
        except Exception:  # a crash in sympy on one answer is a wrong answer, not a dead run
            score = 0.0
        out.write(json.dumps({"score": score}) + "\n")
        out.flush()


# --------------------------------------------------------------------------- grading (parent side)


class _Worker:
    """One grading subprocess speaking JSON lines over its stdin/stdout."""

    def __init__(self) -> None:
        src_root = str(Path(__file__).resolve().parents[2])
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (src_root, env.get("PYTHONPATH", "")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from thoughtfold.tasks.rewards import _serve; _serve()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            env=env, start_new_session=True,
        )
        self.fd = self.proc.stdout.fileno()
        self.buffer = b""
        self.ready = False
        self.started = time.monotonic()
        self.item: int | None = None
        self.deadline = 0.0

    def send(self, item: int, pred: str | None, gold: str, timeout_s: float) -> None:
        self.item, self.deadline = item, time.monotonic() + timeout_s
        with contextlib.suppress(OSError):  # a dead worker: its EOF on stdout retries the item
            self.proc.stdin.write((json.dumps({"pred": pred, "gold": gold}) + "\n").encode())
            self.proc.stdin.flush()

    def read_lines(self) -> list[dict] | None:
        """Complete reply lines available now; None on EOF (the worker died)."""
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None
        self.buffer += chunk
        *lines, self.buffer = self.buffer.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

    def kill(self) -> None:
        with contextlib.suppress(OSError):
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.wait(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError):
                stream.close()


class MathGrader:
    """Grades (prediction, gold) pairs in a small pool of worker processes with a hard per-item
    timeout. Thread-safe (calls are serialised); workers start lazily and are reused."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S, num_workers: int | None = None) -> None:
        if timeout_s <= 0:
            raise ConfigError(f"reward timeout_s must be > 0, got {timeout_s}")
        self.timeout_s = float(timeout_s)
        self.num_workers = num_workers or max(1, min(4, os.cpu_count() or 1))
        self.workers: list[_Worker] = []
        self.timeouts = 0  # items cut off so far (for logs)
        self._lock = threading.Lock()

    def grade(self, pairs: Sequence[tuple[str | None, str]]) -> list[float | None]:
        """Scores for ``(pred, gold)`` pairs: 1.0 / 0.0, None for unparseable gold; 0.0 on timeout."""
        results: list[float | None] = [None] * len(pairs)
        pending: deque[int] = deque()
        for i, (pred, gold) in enumerate(pairs):
            gold_int, pred_int = _int_literal(gold), (_int_literal(pred) if pred is not None else None)
            if gold_int is not None and (pred is None or pred_int is not None):
                results[i] = float(pred_int == gold_int)  # exact; no need for sympy
            else:
                pending.append(i)
        if pending:
            with self._lock:
                self._run(pairs, pending, results)
        return results

    def _run(self, pairs: Sequence[tuple[str | None, str]], pending: deque[int],
             results: list[float | None]) -> None:
        self._ensure_workers()
        attempts: dict[int, int] = {}
        in_flight = 0
        while pending or in_flight:
            for worker in self.workers:
                if worker.ready and worker.item is None and pending:
                    item = pending.popleft()
                    worker.send(item, pairs[item][0], pairs[item][1], self.timeout_s)
                    in_flight += 1
            in_flight -= self._wait(results, pending, attempts)

    def _wait(self, results: list[float | None], pending: deque[int], attempts: dict[int, int]) -> int:
        """Wait for replies or the next deadline; returns how many in-flight items finished."""
        now = time.monotonic()
        deadlines = [w.deadline for w in self.workers if w.item is not None]
        deadlines += [w.started + _STARTUP_TIMEOUT_S for w in self.workers if not w.ready]
        wait_s = max(0.0, min(deadlines) - now) if deadlines else 0.0
        with selectors.DefaultSelector() as selector:  # epoll/poll: no FD_SETSIZE limit, unlike select()
            for worker in self.workers:
                selector.register(worker.fd, selectors.EVENT_READ)
            readable = {key.fd for key, _ in selector.select(wait_s)}
        done = 0
        for index, worker in enumerate(list(self.workers)):
            if worker.fd in readable:
                lines = worker.read_lines()
                if lines is None:  # died: retry its item once on a fresh worker, then score 0
                    done += self._replace(index, results, pending, attempts, crashed=True)
                    continue
                for reply in lines:
                    done += self._handle_reply(worker, reply, results)
            elif worker.item is not None and time.monotonic() >= worker.deadline:
                self.timeouts += 1
                done += self._replace(index, results, pending, attempts, crashed=False)
            elif not worker.ready and time.monotonic() >= worker.started + _STARTUP_TIMEOUT_S:
                self._shutdown()
                raise ThoughtfoldError(f"math reward worker did not start within {_STARTUP_TIMEOUT_S:.0f} s")
        return done

    def _handle_reply(self, worker: _Worker, reply: dict, results: list[float | None]) -> int:
        if "error" in reply:
            self._shutdown()
            raise ConfigError(f"math reward needs math-verify (pip install math-verify): {reply['error']}")
        if reply.get("ready"):
            worker.ready = True
            return 0
        results[worker.item] = reply["score"]
        worker.item = None
        return 1

    def _replace(self, index: int, results: list[float | None], pending: deque[int],
                 attempts: dict[int, int], crashed: bool) -> int:
        """Kill worker ``index`` and start a fresh one; its item is retried once if it crashed."""
        worker = self.workers[index]
        item = worker.item
        worker.kill()
        self.workers[index] = _Worker()
        if item is None:
            return 0
        attempts[item] = attempts.get(item, 0) + 1
        if crashed and attempts[item] < 2:
            pending.appendleft(item)
        else:
            results[item] = 0.0
        return 1

    def _ensure_workers(self) -> None:
        if importlib.util.find_spec("math_verify") is None:
            raise ConfigError("math reward needs math-verify: pip install math-verify")
        while len(self.workers) < self.num_workers:
            self.workers.append(_Worker())

    def _shutdown(self) -> None:
        for worker in self.workers:
            worker.kill()
        self.workers = []

    def close(self) -> None:
        """Stop the worker processes (they also exit on their own when this process ends)."""
        with self._lock:
            self._shutdown()


_default_grader: MathGrader | None = None
_default_lock = threading.Lock()


def default_grader() -> MathGrader:
    """The process-wide grader used by :func:`math_reward` (created on first use)."""
    global _default_grader
    with _default_lock:
        if _default_grader is None:
            _default_grader = MathGrader()
            atexit.register(_default_grader.close)
    return _default_grader


# --------------------------------------------------------------------------- reward functions


def _golds(answer: Sequence[Any] | None, n: int) -> list[str | None]:
    if answer is None:
        raise ConfigError("math_reward needs an 'answer' column with the gold answers")
    if len(answer) != n:
        raise ConfigError(f"math_reward got {n} completions but {len(answer)} answers")
    return [None if a is None or str(a).strip() == "" else str(a) for a in answer]


def make_math_reward(timeout_s: float = DEFAULT_TIMEOUT_S, num_workers: int | None = None) -> RewardFn:
    """A :func:`math_reward` with its own grader (per-item timeout, worker count)."""
    grader = MathGrader(timeout_s=timeout_s, num_workers=num_workers)

    def math_reward(prompts: Sequence[Any] | None, completions: Sequence[Any],
                    answer: Sequence[Any] | None = None, **columns: Any) -> list[float | None]:
        return _math_reward(grader, completions, answer)

    math_reward.grader = grader  # type: ignore[attr-defined]
    return math_reward


def _math_reward(grader: MathGrader, completions: Sequence[Any],
                 answer: Sequence[Any] | None) -> list[float | None]:
    golds = _golds(answer, len(completions))
    preds = [extract_answer(c) for c in completions]
    todo = [i for i, g in enumerate(golds) if g is not None]
    scores = grader.grade([(preds[i], golds[i]) for i in todo])  # type: ignore[misc]
    results: list[float | None] = [None] * len(completions)
    for i, score in zip(todo, scores, strict=True):
        results[i] = score
    return results


def math_reward(prompts: Sequence[Any] | None, completions: Sequence[Any],
                answer: Sequence[Any] | None = None, **columns: Any) -> list[float | None]:
    """1.0 if the completion's final answer (last ``\\boxed{}`` after ``</think>``, else the stated /
    last answer) is equivalent to the gold ``answer`` per math-verify, else 0.0; None where the gold
    cannot be parsed. Each item has a hard timeout (:data:`DEFAULT_TIMEOUT_S`) scoring 0.0."""
    return _math_reward(default_grader(), completions, answer)


def format_reward(prompts: Sequence[Any] | None, completions: Sequence[Any], **columns: Any) -> list[float]:
    """1.0 if the completion ends its reasoning (a ``<think>`` is closed) and gives exactly one
    non-empty ``\\boxed{}`` answer after it, else 0.0."""
    scores = []
    for completion in completions:
        text = final_section(completion_text(completion))
        boxes = boxed_spans(text) if text is not None else []
        scores.append(1.0 if len(boxes) == 1 and text[slice(*boxes[0])].strip() else 0.0)
    return scores


def arith_reward(prompts: Sequence[Any] | None, completions: Sequence[Any],
                 answer: Sequence[Any] | None = None, **columns: Any) -> list[float | None]:
    """Exact numeric match of the last ``\\boxed{}`` (else the last number) with the gold number;
    in-process and cheap, for the procedural arithmetic task. None where the gold is not a number."""
    golds = _golds(answer, len(completions))
    scores: list[float | None] = []
    for completion, gold in zip(completions, golds, strict=True):
        gold_value = _as_number(gold) if gold is not None else None
        if gold_value is None:
            scores.append(None)
            continue
        text = final_section(completion_text(completion))
        pred = None if text is None else (last_boxed(text) or last_number(text))
        pred_value = _as_number(pred) if pred is not None else None
        scores.append(1.0 if pred_value is not None and pred_value == gold_value else 0.0)
    return scores


def _as_number(text: str):
    """``text`` as an exact Fraction if it is a plain integer, decimal or a/b, else None. A decimal
    exponent beyond +-MAX_EXPONENT is not a number here: Fraction("1e100000000") computes 10**1e8 for
    minutes, and the reward must stay cheap whatever the model (or the data) writes."""
    from fractions import Fraction

    text = text.strip().strip("$").replace(",", "").replace(" ", "")
    exponent = _EXPONENT_RE.search(text)
    if exponent and (len(exponent.group(1)) > 6 or int(exponent.group(1)) > MAX_EXPONENT):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):  # also integers over 4,300 digits, which int() refuses
        return None


def score_completions(name: str, fn: RewardFn, prompts: list, completions: list, completion_ids: list | None,
                      examples: Sequence[dict], repeat: int = 1) -> list[float | None]:
    """`fn`'s checked scores, called the TRL way: prompts, completions, completion_ids and every
    dataset column but the prompt as a keyword list aligned with the completions (each example
    stands for `repeat` consecutive completions: a GRPO group)."""
    keys = sorted({k for e in examples for k in e if k != "prompt"})
    columns = {k: [e.get(k) for e in examples for _ in range(repeat)] for k in keys}
    scores = fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    return checked_scores(name, scores, len(completions))


def checked_scores(name: str, scores: Any, n: int) -> list[float | None]:
    """A reward function's output as floats (None = skipped), or a one-line ConfigError: a reward
    that returns strings or the wrong count is a bug in that function, not in the run."""
    if not isinstance(scores, Sequence) or isinstance(scores, (str, bytes)):
        raise ConfigError(f"reward {name} returned {type(scores).__name__}, not a list of {n} scores")
    if len(scores) != n:
        raise ConfigError(f"reward {name} returned {len(scores)} scores for {n} completions")
    return [None if s is None else _score_value(name, s) for s in scores]


def _score_value(name: str, score: Any) -> float:
    try:
        if isinstance(score, (str, bytes)):
            raise TypeError
        return float(score)  # also numpy scalars and one-element tensors
    except (TypeError, ValueError):
        raise ConfigError(f"reward {name} returned {score!r:.60} ({type(score).__name__}); "
                          "scores must be numbers or None") from None


# --------------------------------------------------------------------------- lookup by name

BUILTIN_REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "accuracy": math_reward,
    "format": format_reward,
    "arith": arith_reward,
    "recall": recall_reward,
}


def load_reward(spec: str | Callable) -> RewardFn:
    """A reward function from a built-in name (``math``, ``accuracy``, ``format``, ``arith``, ``recall``), a dotted
    path (``pkg.module:function`` or ``pkg.module.function``) or a file (``path/to/file.py:function``)."""
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
            raise ConfigError(f"reward {spec!r}: importing {module_name} failed ({type(e).__name__}: {e})") from e
        return module
    try:
        return importlib.import_module(module_name)
    except Exception as e:
        raise ConfigError(
            f"reward {spec!r}: cannot import module {module_name!r} ({type(e).__name__}: {e})"
        ) from e
