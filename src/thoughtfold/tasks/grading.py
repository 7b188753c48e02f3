"""Grading math answers with math-verify in a pool of worker processes, each item under a hard deadline.

Why a subprocess pool: sympy can hang for minutes on a pathological answer (``\\boxed{9^{9^{9^{9}}}}``,
``(10^{10})!``). math-verify's own timeout uses ``signal.alarm``, which only works in the main thread
(in other threads it errors, and math-verify then silently scores 0) and cannot stop long C calls.
So grading runs in worker processes that are killed when an item exceeds its deadline: the item
scores 0.0 and the caller never stalls, whichever thread or process it runs in. Plain integers are
compared exactly in-process, without sympy.
"""

from __future__ import annotations

import atexit
import contextlib
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
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

from ..errors import ConfigError, ThoughtfoldError

DEFAULT_TIMEOUT_S = 5.0
_STARTUP_TIMEOUT_S = 120.0
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
            [sys.executable, "-c", "from thoughtfold.tasks.grading import _serve; _serve()"],
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
