"""Accuracy under cache budgets: pass@1 / pass@k per dataset and window, graded with math-verify.

Every (dataset, window) pair is evaluated with the same model, sampling settings and seeds, so
methods compare under the same cache budget (the window). Output directory layout:

* ``samples.jsonl``: one line per sample -- dataset, window, index, sample, prompt, completion,
  extracted answer, gold, correct, evictions, length, truncated. Append-only, keyed by
  (dataset, window, index, sample), flushed after every batch.
* ``summary.json``: settings + one result row per (dataset, window) (see :func:`summarize`).
* ``eval_config.json``: the settings that define a sample (checked on resume).

Resume: samples are generated in fixed batches (a fixed partition of the flattened
(index, sample) list of a dataset, with a seed derived from (seed, dataset, batch start) only), so a
run that was killed and restarted skips the finished samples, regenerates exactly the unfinished
batches, and ends with the same samples and summary as an uninterrupted run. A line cut short by
the kill is dropped. (Exactly the same samples need the same --n-samples and --batch-size, which
define the partition; with other values the finished samples are still reused.) The seed does not
depend on the window: all windows see the same random draws (common random numbers), which lowers
the variance of between-window differences.
"""

from __future__ import annotations

import json
import logging
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..config import CacheConfig, SamplingConfig
from ..errors import ConfigError, DataError, RewardError
from ..persist import atomic_write_text, weights_digest
from ..policy import Policy
from ..render import markdown_table
from ..rows import check_rows
from ..tasks.answers import extract_answer
from ..tasks.data import load_dataset_by_name
from ..tasks.example import SYSTEM_PROMPT
from ..tasks.rewards import keep_traceback, load_reward, make_math_reward, score_completions

log = logging.getLogger("thoughtfold")

SAMPLES_NAME = "samples.jsonl"
SUMMARY_NAME = "summary.json"
CONFIG_NAME = "eval_config.json"

# settings that change what a sample is: a resumed eval must use the same ones
_SAMPLE_DEFINING = ("model", "adapter", "adapter_sha256", "temperature", "top_p", "top_k", "max_new_tokens",
                    "evict_ratio", "eviction", "observe_window", "seed", "system_prompt", "chat_template",
                    "reward", "split")
_ADDED_LATER = {"eviction": "oldest", "observe_window": None}  # what evaluations saved before these used


# --------------------------------------------------------------------------- pass@k


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): 1 - C(n-c, k) / C(n, k), the probability that at least
    one of k samples drawn without replacement from n (c of them correct) is correct."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # 1 - prod_{i=n-c+1}^{n} (1 - k/i): numerically stable, no huge binomials
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def ks_for(n_samples: int) -> list[int]:
    """The k reported for K samples: 1, the powers of two below K, and K."""
    ks, k = [], 1
    while k < n_samples:
        ks.append(k)
        k *= 2
    return ks + [n_samples]


# --------------------------------------------------------------------------- settings


def _eval_sampling() -> SamplingConfig:
    return SamplingConfig(max_new_tokens=1024, temperature=0.6, top_p=0.95, seed=0)


@dataclass
class EvalConfig:
    """What to evaluate and how. Each entry of `windows` (an int, or None for a full cache) is evaluated
    under `cache` with that window (its other settings: evict_ratio, eviction, ...); `sampling` is how
    every batch samples, its seed the base of the per-batch seeds."""

    datasets: list[str]
    windows: list[int | None] = field(default_factory=lambda: [None])
    cache: CacheConfig = field(default_factory=CacheConfig)
    sampling: SamplingConfig = field(default_factory=_eval_sampling)
    n_samples: int = 1
    limit: int | None = None
    batch_size: int = 16
    slots: int | None = None  # of a batch, how many decode at once (None: all); the samples do not change
    split: str | None = None
    prompt_field: str | None = None
    answer_field: str | None = None
    system_prompt: str | None = SYSTEM_PROMPT
    chat_template: bool = True
    reward: str = "math"
    reward_timeout: float | None = 300.0  # seconds one grading call may take
    output_dir: str = "eval"
    method: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if not self.datasets:
            raise ConfigError("name at least one dataset")
        if not self.windows:
            raise ConfigError("name at least one window (an integer or 'none')")
        for window in self.windows:
            self.cache_for(window)
        for name, value in (("n-samples", self.n_samples), ("batch-size", self.batch_size)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if self.slots is not None and self.slots < 1:
            raise ConfigError(f"slots must be >= 1, got {self.slots}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1, got {self.limit}")
        if self.reward_timeout is not None and not self.reward_timeout > 0:
            raise ConfigError(f"reward timeout must be > 0 seconds, got {self.reward_timeout}")
        if isinstance(self.reward, str):
            load_reward(self.reward)  # an unknown reward fails before a model loads or a file is written

    def cache_for(self, window: int | None) -> CacheConfig:
        """The cache one of `windows` is evaluated under (a full cache evicts nothing, so there the
        eviction settings fall back to their defaults)."""
        return self.cache.with_window(window)

    def settings(self) -> dict:
        """The flat record of these settings that an evaluation saves (and checks on resume)."""
        s, c = self.sampling, self.cache
        return {"datasets": self.datasets, "windows": self.windows, "n_samples": self.n_samples,
                "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k,
                "max_new_tokens": s.max_new_tokens, "limit": self.limit, "batch_size": self.batch_size,
                "evict_ratio": c.evict_ratio, "eviction": c.eviction, "observe_window": c.observe_window,
                "seed": s.seed, "split": self.split, "prompt_field": self.prompt_field,
                "answer_field": self.answer_field, "system_prompt": self.system_prompt,
                "chat_template": self.chat_template, "reward": self.reward}


def method_label(policy) -> str:
    """Default method name: the adapter mode ('base' without an adapter)."""
    mode = getattr(getattr(policy, "adapter_config", None), "mode", "none")
    return "base" if mode == "none" else mode


# --------------------------------------------------------------------------- samples file


def _key(record: dict) -> tuple:
    return (record["dataset"], record["window"], int(record["index"]), int(record["sample"]))


def read_samples(path: str | Path) -> dict[tuple, dict]:
    """Records of a samples JSONL keyed by (dataset, window, index, sample); lines cut short or
    unreadable are skipped (a later line with the same key wins)."""
    path = Path(path)
    done: dict[tuple, dict] = {}
    if not path.is_file():
        return done
    with path.open(encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
                done[_key(record)] = record
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                continue
    return done


def _drop_partial_line(path: Path) -> None:
    """Cut a trailing line without its newline (left by a kill), so appends start on a fresh line."""
    if not path.is_file():
        return
    with path.open("rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _check_resume(out: Path, settings: dict, has_samples: bool) -> None:
    """Refuse to add samples of other settings to those in `out`; with no sample there yet (an
    evaluation that failed before its first batch) the new settings simply replace the old."""
    path = out / CONFIG_NAME
    if path.is_file() and has_samples:
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            saved = None
        if saved is not None:
            saved = {**_ADDED_LATER, **saved}
            diffs = [f"{k} {saved.get(k)!r} -> {settings.get(k)!r}" for k in _SAMPLE_DEFINING
                     if saved.get(k) != settings.get(k)]
            if diffs:
                raise ConfigError(
                    f"{out} holds an evaluation with other settings ({'; '.join(diffs)}); use another "
                    "--output or the same settings to resume it"
                )
    atomic_write_text(path, json.dumps(settings, indent=2) + "\n")


# --------------------------------------------------------------------------- grading


class Grader:
    """Scores completions with a reward function (TRL signature); 'math' gets its own math-verify
    worker pool, stopped by :meth:`close`."""

    def __init__(self, spec: str | Callable = "math", timeout: float | None = None):
        self.name = spec if isinstance(spec, str) else getattr(spec, "__name__", "function")
        self.timeout = timeout
        if spec in ("math", "accuracy"):
            self.fn = make_math_reward()
            self._pool = self.fn.grader  # type: ignore[attr-defined]
        else:
            self.fn = load_reward(spec)
            self._pool = None

    def __call__(self, prompts: list, completions: list[str], examples: list[dict],
                 completion_ids: list[list[int]] | None = None) -> list[float | None]:
        return score_completions(self.name, self.fn, prompts, completions, completion_ids, examples,
                                 timeout=self.timeout)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()


# --------------------------------------------------------------------------- the evaluation


def _batch_seed(seed: int, dataset: str, start: int) -> int:
    return random.Random(f"eval:{seed}:{dataset}:{start}").randrange(2**31)


def evaluate(policy, config: EvalConfig, model: str | None = None, adapter: str | None = None,
             datasets: dict[str, Sequence[dict]] | None = None) -> dict:
    """Evaluate ``policy`` on every dataset under every window; write samples and summary to
    ``config.output_dir`` (resuming what is there) and return the summary.

    ``datasets`` maps a dataset name to its examples (else they are loaded by name). Every row is
    checked against the model before anything is written; a reward that fails ends with one
    RewardError, its traceback in the output directory's errors.log."""
    c = config
    loaded = _load_datasets(policy, c, datasets)
    out = Path(c.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = c.method or method_label(policy)
    settings = {"model": model or getattr(policy, "base_model", None), "adapter": adapter, "method": method,
                "adapter_sha256": weights_digest(adapter) if adapter else None, **c.settings()}
    samples_path = out / SAMPLES_NAME
    _drop_partial_line(samples_path)
    done = read_samples(samples_path)
    _check_resume(out, settings, bool(done))
    for (name, _w, index, _s), record in done.items():
        rows = loaded.get(name, [])
        if index < len(rows) and record.get("prompt") != rows[index]["prompt"]:
            raise DataError(f"{samples_path} was written for another version of dataset {name} (problem "
                            f"{index} differs); use another --output")
    _calibrate_heads(policy, c, loaded)
    try:
        generated, already = _sample_all(policy, c, loaded, done, samples_path)
    except RewardError as e:
        raise keep_traceback(e, out) from None
    summary = summarize(done, loaded, c.windows, c.n_samples)
    summary = {"method": method, "model": settings["model"], "adapter": adapter,
               "settings": {k: settings[k] for k in settings if k not in ("model", "adapter", "method")},
               "results": summary}
    atomic_write_text(out / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
    log.info("eval: %d samples generated now, %d reused; wrote %s and %s", generated, already,
             samples_path, out / SUMMARY_NAME)
    return summary


def _load_datasets(policy, c: EvalConfig,
                   datasets: dict[str, Sequence[dict]] | None) -> dict[str, list[dict]]:
    """Each dataset's rows (given, or loaded by name), every one checked against the model."""
    loaded: dict[str, list[dict]] = {}
    for name in c.datasets:
        rows = datasets[name] if datasets is not None and name in datasets else load_dataset_by_name(
            name, split=c.split, limit=c.limit, prompt_field=c.prompt_field, answer_field=c.answer_field)
        loaded[name] = list(rows)[: c.limit] if c.limit else list(rows)
        if not loaded[name]:
            raise DataError(f"dataset {name} has no examples")
        if isinstance(policy, Policy):  # (a stand-in without a model generates what it likes)
            check_rows(policy, loaded[name], c.chat_template, c.system_prompt,
                       lambda row, where: c.sampling.max_new_tokens, "max_new_tokens")
    return loaded


def _calibrate_heads(policy, c: EvalConfig, loaded: dict[str, list[dict]]) -> None:
    """headkv's head weights, when the policy has none (no adapter brought them): calibrated on the
    first batch of the first dataset, as the first generate call would do, whatever a resumed
    evaluation has left to do, so that it evicts exactly as an uninterrupted one."""
    if not isinstance(policy, Policy) or policy.eviction_policy or policy.head_weights is not None:
        return
    if not any(c.cache_for(w).eviction == "headkv" for w in c.windows):
        return
    rows = next(iter(loaded.values()))
    first = [rows[i]["prompt"] for i in range(len(rows)) for _ in range(c.n_samples)][: c.batch_size]
    policy.calibrate_heads(policy.encode(first, c.chat_template, c.system_prompt), c.sampling.max_new_tokens)


def _sample_all(policy, c: EvalConfig, loaded: dict[str, list[dict]], done: dict[tuple, dict],
                samples_path: Path) -> tuple[int, int]:
    """Generate and grade every sample not in `done` (added to it), appending each batch to the
    samples file; returns (generated now, reused)."""
    from tqdm.auto import tqdm

    K = c.n_samples
    total = sum(len(rows) * K for rows in loaded.values()) * len(c.windows)
    already = sum(1 for name, rows in loaded.items() for w in c.windows for i in range(len(rows))
                  for s in range(K) if (name, w, i, s) in done)
    if already:
        log.info("resuming %s: %d of %d samples already done", samples_path.parent, already, total)
    grader = Grader(c.reward, c.reward_timeout)
    bar = tqdm(total=total, initial=already, desc="eval", unit="sample", disable=not c.progress,
               dynamic_ncols=True)
    generated = 0
    try:
        with samples_path.open("a", encoding="utf-8") as f:
            for name, rows in loaded.items():
                items = [(i, s) for i in range(len(rows)) for s in range(K)]
                for window in c.windows:
                    with policy.using_cache(c.cache_for(window)):
                        bar.set_postfix_str(f"{name} W={'full' if window is None else window}", refresh=False)
                        for start in range(0, len(items), c.batch_size):
                            batch = items[start : start + c.batch_size]
                            todo = [j for j, (i, s) in enumerate(batch) if (name, window, i, s) not in done]
                            if not todo:
                                continue
                            records = _run_batch(policy, grader, c, name, window, rows, batch, start)
                            for j in todo:
                                f.write(json.dumps(records[j], ensure_ascii=False) + "\n")
                                done[_key(records[j])] = records[j]
                            f.flush()
                            os.fsync(f.fileno())
                            generated += len(todo)
                            bar.update(len(todo))
    finally:
        bar.close()
        grader.close()
    return generated, already


def _run_batch(policy, grader: Grader, c: EvalConfig, name: str, window: int | None, rows: list[dict],
               batch: list[tuple[int, int]], start: int) -> list[dict]:
    """Generate and grade one fixed batch; returns its records."""
    examples = [rows[i] for i, _ in batch]
    prompts = [e["prompt"] for e in examples]
    sampling = replace(c.sampling, seed=_batch_seed(c.sampling.seed, name, start))
    res = policy.generate(prompts, **sampling.to_dict(), chat_template=c.chat_template,
                          system_prompt=c.system_prompt, slots=c.slots)
    scores = grader(prompts, res.texts, examples, res.completion_ids)
    records = []
    for j, (i, s) in enumerate(batch):
        score = scores[j]
        records.append({
            "dataset": name, "window": window, "index": i, "sample": s,
            "prompt": prompts[j], "completion": res.texts[j], "extracted": extract_answer(res.texts[j]),
            "gold": examples[j].get("answer"), "correct": None if score is None else score >= 1.0,
            "score": score, "evictions": res.evictions[j], "length": len(res.completion_ids[j]),
            "truncated": res.truncated[j],
        })
    return records


def summarize(done: dict[tuple, dict], loaded: dict[str, list[dict]], windows: Sequence[int | None],
              n_samples: int) -> list[dict]:
    """One row per (dataset, window): pass@k for k in :func:`ks_for`, mean length / evictions,
    truncated fraction. Problems whose gold cannot be graded are left out and counted."""
    results = []
    ks = ks_for(n_samples)
    for name, rows in loaded.items():
        for window in windows:
            per_problem, records, ungraded = [], [], 0
            for i in range(len(rows)):
                recs = [done[(name, window, i, s)] for s in range(n_samples) if (name, window, i, s) in done]
                records += recs
                if len(recs) < n_samples:
                    continue
                if any(r.get("correct") is None for r in recs):
                    ungraded += 1
                    continue
                per_problem.append(sum(bool(r["correct"]) for r in recs))
            n = len(per_problem)
            row: dict[str, Any] = {
                "dataset": name, "window": window, "problems": len(rows), "graded_problems": n,
                "ungraded_problems": ungraded, "n_samples": n_samples,
                "pass@1": _mean([c / n_samples for c in per_problem]),
                "pass@k": {str(k): _mean([pass_at_k(n_samples, c, k) for c in per_problem]) for k in ks},
                "mean_length": _mean([r["length"] for r in records]),
                "mean_evictions": _mean([r["evictions"] for r in records]),
                "truncated": _mean([float(bool(r.get("truncated"))) for r in records]),
                "complete": len(records) == len(rows) * n_samples,
            }
            results.append(row)
    return results


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# --------------------------------------------------------------------------- printing


def window_name(window: int | None) -> str:
    return "full" if window is None else str(window)


def pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def summary_table(summary: dict) -> str:
    """The summary as a markdown table: dataset, window, problems, pass@k (%), length, evictions."""
    results = summary["results"]
    ks = sorted({int(k) for r in results for k in r["pass@k"]})
    header = ["dataset", "window", "problems", *[f"pass@{k} %" for k in ks], "mean length",
              "evictions/sample", "truncated %"]
    rows = []
    for r in results:
        problems = str(r["problems"]) if r["graded_problems"] == r["problems"] else \
            f"{r['graded_problems']}/{r['problems']}"
        rows.append([r["dataset"], window_name(r["window"]), problems,
                     *[pct(r["pass@k"].get(str(k))) for k in ks],
                     "-" if r["mean_length"] is None else f"{r['mean_length']:.0f}",
                     "-" if r["mean_evictions"] is None else f"{r['mean_evictions']:.1f}",
                     pct(r["truncated"])])
    return markdown_table(header, rows)
