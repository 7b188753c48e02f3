"""Delayed recall with local reasoning: a procedural task whose answer provably depends on thought
tokens that a bounded cache evicts.

A trace (the completion) is

    v  C0 d0  C1 d1 ... C(N-1) d(N-1)  =  y  <eos>

* ``v`` is the *early value*: one of 10 value symbols (``a``..``j``, value 0..9) that the model
  chooses itself (it is sampled; the prompt says nothing about it);
* ``Ck dk`` are N local steps: a step counter symbol ``Ck`` (so the model knows where it is and when
  to stop without counting from the start) and the digit ``dk = (d(k-1) + d(k-2)) mod 10`` -- a
  Fibonacci chain mod 10 started from the two digits of the prompt (``d(-2), d(-1)``). Each step
  needs only the last 3 thought tokens;
* ``y`` is the answer digit: ``y = v`` (``combine="copy"``, the default: recall the value after the
  chain) or ``y = (v + d(N-1)) mod 10`` (``combine="add"``: combine it with the end of the chain).
  Either way ``y`` is a bijection of ``v`` once the chain is fixed. (A 0.9M-parameter Llama trained
  from scratch on CPU learns the chain and the copy within a few hundred steps, but was still at
  chance on the additive answer after 600 steps, so the experiment uses the copy.)

The prompt is ``<bos> d(-2) d(-1)``. The distance from the early value to the answer is
D = 2N + 2 tokens: with a window W < D the early value is evicted before it is needed.

The checker is strict: the whole trace must be the unique correct one for the trace's *own* early
value (the chain is fully determined by the prompt, so no token besides ``v`` is free and nothing
can smuggle ``v`` past the window). A policy whose answer does not depend on ``v`` is right with
probability at most 1/10 whatever it does (``y`` is a bijection of ``v`` for a fixed chain):
chance = 0.1.

Token ids (`Policy` and the trainers take token-id prompts and targets): PAD 0, BOS 1, EOS 2,
``=`` 3, digits 4..13, value symbols 14..23, counters 24..24+N-1. :func:`recall_tokenizer` gives a
word-level tokenizer over the same ids (saved with a model trained on the task, so the model
directory loads like any other and completions decode to readable text).

As data (``recall``, ``recall:steps=31,n=4096``, see :func:`recall_dataset`) every row is a token-id
prompt, a correct trace as the SFT target (``solution``), and the columns the ``recall`` reward
reads. ``loss_mask_prefix = 1`` keeps the early value out of the GRPO loss: it is a free choice,
and rewarding it would let the policy collapse v to a constant, which needs no recall.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from ..checks import check_int
from ..errors import ConfigError

PAD, BOS, EOS, EQ = 0, 1, 2, 3
DIGIT0, VALUE0, COUNTER0 = 4, 14, 24
NUM_VALUES = 10
MAX_STEPS = 4097  # chain steps (each adds a counter symbol to the vocabulary): far beyond any use
MAX_ROWS = 1_000_001  # rows of a generated dataset, all held in memory
_COUNTER_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ" + "".join(chr(c) for c in range(0x391, 0x3AA))  # Latin, Greek


@dataclass(frozen=True)
class Check:
    """Verdict on one trace: `correct` (the reward), and where it went wrong otherwise."""

    correct: bool
    chain_ok: bool  # the counters and digits of the chain are right
    value: int | None  # the early value the trace chose (None if the first token is no value symbol)
    answer: int | None  # the digit the trace answered (None if missing)
    expected: int | None  # the right answer for the trace's value, when value is known


@dataclass(frozen=True)
class RecallTask:
    """The task with `steps` chain steps (D = 2 * steps + 2); `combine`: "copy" or "add"."""

    steps: int = 31
    combine: str = "copy"

    def __post_init__(self) -> None:
        if self.combine not in ("copy", "add"):
            raise ConfigError(f"combine must be 'copy' or 'add', got {self.combine!r}")
        check_int("recall steps", self.steps, 1, MAX_STEPS)

    # ---- sizes

    @property
    def distance(self) -> int:
        """D: tokens from the early value (completion index 0) to the answer (index 2N + 2)."""
        return 2 * self.steps + 2

    @property
    def vocab_size(self) -> int:
        return COUNTER0 + self.steps

    @property
    def completion_length(self) -> int:
        """Tokens of a correct trace, EOS included."""
        return 2 * self.steps + 4

    @property
    def chance(self) -> float:
        return 1.0 / NUM_VALUES

    # ---- generation

    def prompt(self, a: int, b: int) -> list[int]:
        return [BOS, DIGIT0 + a, DIGIT0 + b]

    def chain(self, a: int, b: int) -> list[int]:
        """The N chain digits started from (a, b)."""
        out, prev2, prev1 = [], a, b
        for _ in range(self.steps):
            prev2, prev1 = prev1, (prev1 + prev2) % 10
            out.append(prev1)
        return out

    def trace(self, a: int, b: int, value: int) -> list[int]:
        """The correct completion (EOS included) for prompt digits (a, b) and early value `value`."""
        if not (0 <= a < 10 and 0 <= b < 10 and 0 <= value < NUM_VALUES):
            raise ValueError(f"digits and value must be in [0, 10), got {a}, {b}, {value}")
        digits = self.chain(a, b)
        out = [VALUE0 + value]
        for k, d in enumerate(digits):
            out += [COUNTER0 + k, DIGIT0 + d]
        return out + [EQ, DIGIT0 + self.answer(value, digits[-1]), EOS]

    def answer(self, value: int, last_digit: int) -> int:
        return value if self.combine == "copy" else (value + last_digit) % 10

    def sample_prompts(self, n: int, seed: int) -> list[list[int]]:
        """`n` prompts with uniform start digits, a pure function of `seed`."""
        rng = random.Random(f"recall-prompts:{seed}")
        return [self.prompt(rng.randrange(10), rng.randrange(10)) for _ in range(n)]

    def sample_traces(self, n: int, seed: int) -> tuple[list[list[int]], list[list[int]]]:
        """`n` (prompt, correct trace) pairs with uniform start digits and early values: the
        full-cache training data."""
        rng = random.Random(f"recall-traces:{seed}")
        prompts, traces = [], []
        for _ in range(n):
            a, b, v = rng.randrange(10), rng.randrange(10), rng.randrange(NUM_VALUES)
            prompts.append(self.prompt(a, b))
            traces.append(self.trace(a, b, v))
        return prompts, traces

    # ---- checking

    def parse_prompt(self, prompt_ids: Sequence[int]) -> tuple[int, int]:
        ids = list(prompt_ids)
        if len(ids) != 3 or ids[0] != BOS or not all(DIGIT0 <= t < DIGIT0 + 10 for t in ids[1:]):
            raise ValueError(f"not a recall prompt: {ids}")
        return ids[1] - DIGIT0, ids[2] - DIGIT0

    def check(self, prompt_ids: Sequence[int], completion_ids: Sequence[int]) -> Check:
        """Grade a completion against the trace's own early value (strict: the whole trace)."""
        a, b = self.parse_prompt(prompt_ids)
        ids = list(completion_ids)
        value = ids[0] - VALUE0 if ids and VALUE0 <= ids[0] < VALUE0 + NUM_VALUES else None
        n = self.completion_length
        answer = ids[n - 2] - DIGIT0 if len(ids) >= n - 1 and DIGIT0 <= ids[n - 2] < DIGIT0 + 10 else None
        if value is None:
            return Check(False, False, None, answer, None)
        target = self.trace(a, b, value)
        chain_ok = ids[1 : n - 3] == target[1 : n - 3]
        return Check(ids == target, chain_ok, value, answer, target[n - 2] - DIGIT0)

    def reward(self, prompts=None, completions=None, completion_ids=None, **_) -> list[float]:
        """TRL-style reward: 1.0 for a correct trace, else 0.0 (prompts are token-id lists)."""
        return [float(self.check(p, c).correct) for p, c in zip(prompts, completion_ids, strict=True)]

    # ---- display

    def symbols(self) -> list[str]:
        """One printable symbol per token id (index = id)."""
        counters = [_COUNTER_CHARS[k] if k < len(_COUNTER_CHARS) else f"<{k}>" for k in range(self.steps)]
        return ["_", "^", "$", "=", *"0123456789", *"abcdefghij", *counters]

    def render(self, ids: Sequence[int]) -> str:
        """A readable string of token ids (for logs)."""
        symbols = self.symbols()
        return "".join(symbols[t] if 0 <= t < len(symbols) else "?" for t in ids)


# --------------------------------------------------------------------------- as data


@dataclass(frozen=True)
class RecallData:
    """The task as a dataset: ``n`` rows, row ``i`` a pure function of (seed, split, i)."""

    steps: int = 31
    combine: str = "copy"
    n: int = 4096
    seed: int = 0

    @property
    def task(self) -> RecallTask:
        return RecallTask(self.steps, self.combine)


def parse_recall_spec(spec: str) -> RecallData:
    """``recall`` or ``recall:steps=31,combine=copy,n=4096,seed=0``; ConfigError on a bad option."""
    head, _, rest = spec.partition(":")
    if head.strip() != "recall":
        raise ConfigError(f"not a recall spec: {spec!r}")
    data = RecallData()
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, sep, value = (x.strip() for x in part.partition("="))
        if not sep or key not in ("steps", "combine", "n", "seed"):
            raise ConfigError(f"recall: bad option {part!r}; options: steps=, combine=, n=, seed=")
        try:
            data = replace(data, **{key: value if key == "combine" else int(value)})
        except ValueError:
            raise ConfigError(f"recall: option {key}={value!r} is not a whole number") from None
    check_int("recall: n", data.n, 1, MAX_ROWS)
    data.task  # noqa: B018 (validates steps and combine)
    return data


def recall_dataset(data: RecallData, split: str = "train", limit: int | None = None) -> list[dict[str, Any]]:
    """Rows ``{"prompt": ids, "answer": "", "solution": ids, "recall_steps", "recall_combine",
    "loss_mask_prefix": 1}``; the "test" split draws from another random stream than "train"."""
    task = data.task
    rows = []
    for i in range(data.n if limit is None else min(limit, data.n)):
        rng = random.Random(f"recall:{split}:{data.seed}:{i}")
        a, b, v = rng.randrange(10), rng.randrange(10), rng.randrange(NUM_VALUES)
        rows.append({"prompt": task.prompt(a, b), "answer": "", "solution": task.trace(a, b, v),
                     "recall_steps": task.steps, "recall_combine": task.combine, "loss_mask_prefix": 1})
    return rows


def recall_reward(prompts: Sequence[Sequence[int]], completions: Sequence[Any] | None = None,
                  completion_ids: Sequence[Sequence[int]] | None = None,
                  recall_steps: Sequence[int] | None = None, recall_combine: Sequence[str] | None = None,
                  **_: Any) -> list[float | None]:
    """TRL-style reward of the ``recall`` data: 1.0 for the correct trace of its own early value,
    else 0.0; None for a row that is not a recall row (no task columns or not a token-id prompt)."""
    if completion_ids is None:
        raise ConfigError("the recall reward needs completion_ids (token ids of the completions)")
    n = len(completion_ids)
    steps, combine = recall_steps or [None] * n, recall_combine or ["copy"] * n
    scores: list[float | None] = []
    for prompt, ids, k, how in zip(prompts, completion_ids, steps, combine, strict=True):
        try:
            scores.append(float(RecallTask(int(k), how).check(prompt, ids).correct))
        except (TypeError, ValueError):
            scores.append(None)
    return scores


recall_reward.columns = (("recall_steps",),)  # the dataset columns it reads


def recall_tokenizer(task: RecallTask):
    """A word-level `PreTrainedTokenizerFast` whose ids are the task's token ids (whitespace-split
    symbols; ``^`` BOS, ``$`` EOS, ``_`` PAD), so a model trained on the task saves and loads as an
    ordinary HF model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(task.symbols())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="?" if "?" in vocab else None))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="^", eos_token="$", pad_token="_",
                                   clean_up_tokenization_spaces=False)


__all__ = ["BOS", "EOS", "PAD", "Check", "RecallData", "RecallTask", "parse_recall_spec", "recall_dataset",
           "recall_reward", "recall_tokenizer"]
