"""The procedural multi-step arithmetic task ("What is 23 + 45 - 12?"): its problems (deterministic
from a seed, with worked solutions as SFT targets), the spec that names a variant (``arith:easy``,
``arith:steps=3,digits=2``) and its reward (an exact numeric match, cheap and in-process). A bad
spec is a ConfigError."""

from __future__ import annotations

import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from fractions import Fraction
from typing import Any

from ..checks import check_int
from ..errors import ConfigError
from .answers import completion_text, final_section, gold_answers, last_boxed, last_number
from .example import Example
from .recall import MAX_ROWS

_EXPONENT_RE = re.compile(r"[eE][+-]?0*(\d+)$")
MAX_EXPONENT = 10_000

@dataclass(frozen=True)
class ArithConfig:
    """Multi-step integer arithmetic ("What is 23 + 45 - 12?"), deterministic from the seed.

    Difficulty knobs: ``steps`` operations (``steps + 1`` operands); operands of exactly ``digits``
    digits (1 -> 1..9, 2 -> 10..99); ``ops`` drawn from "+", "-", "*" (standard precedence;
    the right operand of "*" has ``mul_digits`` digits); ``negative`` allows partial results below 0.
    Example ``i`` depends only on (seed, split, i, knobs), so ``n`` and ``limit`` never change
    earlier problems. The splits partition the problems: an expression is a "test" problem when a
    hash of it falls in the held-out quarter (:func:`held_out`), so no test problem is ever trained
    on, even where there are few (81 for "tiny": about 20 held out).
    """

    steps: int = 2
    digits: int = 1
    ops: str = "+"
    mul_digits: int = 1
    negative: bool = False
    n: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        for name, top in (("steps", 1001), ("digits", 101), ("mul_digits", 101), ("n", MAX_ROWS)):
            check_int(f"arith: {name}", getattr(self, name), 1, top)
        if not self.ops or set(self.ops) - set("+-*"):
            raise ConfigError(f"arith: ops must be a non-empty mix of '+', '-', '*', got {self.ops!r}")


# Presets, easiest first. Base accuracy of SmolLM2-135M-Instruct (bundled GGUF, 64 test prompts,
# SYSTEM_PROMPT, temperature 0.7, 64 new tokens, arith reward), measured once on CPU: "tiny" 33%
# (inside the default run's 10-60% band), "easy" 6% (9% with 128 new tokens); about 2/3 of the
# completions are cut at 64 tokens (1/4 at 128).
ARITH_PRESETS: dict[str, ArithConfig] = {
    "tiny": ArithConfig(steps=1, digits=1, ops="+"),
    "easy": ArithConfig(steps=2, digits=1, ops="+"),
    "medium": ArithConfig(steps=2, digits=2, ops="+-"),
    "hard": ArithConfig(steps=3, digits=2, ops="+-*"),
}
DEFAULT_ARITH = "easy"


def _operand(rng: random.Random, digits: int) -> int:
    return rng.randint(10 ** (digits - 1) if digits > 1 else 1, 10**digits - 1)


def _evaluate(operands: list[int], ops: list[str]) -> tuple[int, list[int]]:
    """Value with standard precedence, and the running sums of the product terms (for the
    no-negative check)."""
    terms, signs = [operands[0]], [1]
    for op, x in zip(ops, operands[1:], strict=True):
        if op == "*":
            terms[-1] *= x
        else:
            terms.append(x)
            signs.append(1 if op == "+" else -1)
    partial, running = 0, []
    for sign, term in zip(signs, terms, strict=True):
        partial += sign * term
        running.append(partial)
    return partial, running


def held_out(expression: str) -> bool:
    """Whether a problem belongs to the test split: a fixed quarter of all problems, by a hash of
    the expression (the same on every machine and Python run)."""
    return zlib.crc32(expression.encode()) % 4 == 0


def arith_example(config: ArithConfig, index: int, split: str = "train") -> Example:
    """Problem ``index`` of the split: rejection-sampled until it belongs to the split (test: the
    held-out quarter, any other split: the rest) and, unless asked, partial results are >= 0."""
    rng = random.Random(f"arith:{split}:{config.seed}:{index}")
    for _ in range(10_000):
        ops = [rng.choice(config.ops) for _ in range(config.steps)]
        operands = [_operand(rng, config.digits)]
        operands += [_operand(rng, config.mul_digits if op == "*" else config.digits) for op in ops]
        value, running = _evaluate(operands, ops)
        terms = [f"{op} {x}" for op, x in zip(ops, operands[1:], strict=True)]
        expression = " ".join([str(operands[0]), *terms])
        if (config.negative or min(running) >= 0) and held_out(expression) == (split == "test"):
            break
    else:
        raise ConfigError(f"arith: could not draw a {split} problem with {config} (non-negative unless "
                          "negative=true)")
    return Example(f"What is {expression}?", str(value), task="arith", expression=expression,
                   steps=config.steps, digits=config.digits, solution=worked_solution(operands, ops))


def worked_solution(operands: list[int], ops: list[str]) -> str:
    """A step-by-step trace ending in ``\\boxed{}`` (products first, then left to right): the
    target for supervised training on the task."""
    lines, terms, signs = [], [operands[0]], ["+"]
    for op, x in zip(ops, operands[1:], strict=True):
        if op == "*":
            lines.append(f"{terms[-1]} * {x} = {terms[-1] * x}")
            terms[-1] *= x
        else:
            terms.append(x)
            signs.append(op)
    total = terms[0]
    for sign, term in zip(signs[1:], terms[1:], strict=True):
        new = total + term if sign == "+" else total - term
        lines.append(f"{total} {sign} {term} = {new}")
        total = new
    return "\n".join(lines + [f"The answer is \\boxed{{{total}}}."])


def arith_dataset(config: ArithConfig | str = DEFAULT_ARITH, split: str = "train",
                  limit: int | None = None) -> list[Example]:
    """``config.n`` arithmetic problems (or ``limit`` if smaller); ``config`` may be a spec string."""
    if isinstance(config, str):
        config = parse_arith_spec(config)
    n = config.n if limit is None else min(config.n, limit)
    return [arith_example(config, i, split) for i in range(n)]


def parse_arith_spec(spec: str) -> ArithConfig:
    """``arith``, ``arith:easy``, ``arith:steps=3,digits=2,n=200,seed=0`` or ``arith:easy,n=100``."""
    head, _, rest = spec.partition(":")
    if head.strip() != "arith":
        raise ConfigError(f"not an arith spec: {spec!r}")
    config = ARITH_PRESETS[DEFAULT_ARITH]
    types = {f.name: f.type for f in fields(ArithConfig)}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        if "=" not in part:
            if part not in ARITH_PRESETS:
                raise ConfigError(f"arith: unknown preset {part!r}; presets: {', '.join(ARITH_PRESETS)}")
            config = ARITH_PRESETS[part]
            continue
        key, _, value = (s.strip() for s in part.partition("="))
        if key not in types:
            raise ConfigError(f"arith: unknown option {key!r}; options: {', '.join(types)}")
        config = replace(config, **{key: _convert(key, value, types[key])})
    return config


def _convert(key: str, value: str, type_name: Any) -> Any:
    name = getattr(type_name, "__name__", str(type_name))
    try:
        if name == "bool":
            if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(value)
            return value.lower() in ("1", "true", "yes")
        return int(value) if name == "int" else value
    except ValueError:
        raise ConfigError(f"arith: option {key}={value!r} is not a valid {name}") from None


def arith_reward(prompts: Sequence[Any] | None, completions: Sequence[Any],
                 answer: Sequence[Any] | None = None, solution: Sequence[Any] | None = None,
                 **columns: Any) -> list[float | None]:
    """Exact numeric match of the last ``\\boxed{}`` (else the last number) with the gold number
    (the ``answer`` column, else TRL's ``solution``); in-process and cheap, for the procedural
    arithmetic task. None where the gold is not a number."""
    golds = gold_answers(answer, len(completions), "arith_reward", solution)
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


arith_reward.columns = (("answer", "solution"),)  # the dataset columns it reads (any one of each tuple)


def _as_number(text: str):
    """``text`` as an exact Fraction if it is a plain integer, decimal or a/b, else None. A decimal
    exponent beyond +-MAX_EXPONENT is not a number here: Fraction("1e100000000") computes 10**1e8 for
    minutes, and the reward must stay cheap whatever the model (or the data) writes."""
    text = text.strip().strip("$").replace(",", "").replace(" ", "")
    exponent = _EXPONENT_RE.search(text)
    if exponent and (len(exponent.group(1)) > 6 or int(exponent.group(1)) > MAX_EXPONENT):
        return None
    try:
        return Fraction(text)
    except (ValueError, ZeroDivisionError):  # also integers over 4,300 digits, which int() refuses
        return None
