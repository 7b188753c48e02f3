"""Word recall in chat (`recall-words`): the model picks a noun from a list of K single-token words,
counts, then writes its noun again. The noun has left the cache at least one whole window before it
is repeated, so only what the policy carried past the eviction can bring it back: an arm that cannot
recall it is right 1 time in K (if it picks its nouns uniformly, which the entropy row checks).

Every setting is in `recall-words.yaml` (items, filler length, window, evict ratio, seed, steps,
learning rates, arms, sample sizes); `run.py --set key=value` overrides any of them.
"""

from __future__ import annotations

import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import torch
from common import Log, arm_config, row, run_arms, train_arm

from thoughtfold.config import CacheConfig
from thoughtfold.engine.replay import default_schedule
from thoughtfold.evaluation.intervals import bootstrap_interval, newcombe_interval, wilson_interval
from thoughtfold.policy import Policy
from thoughtfold.training.checkpoint import ADAPTER_DIR, list_checkpoints

NAME = "recall-words"


class WordRecall:
    """The task: prompts, traces and the strict checker."""

    def __init__(self, task: dict):
        self.items = [str(w) for w in task["items"]]
        self.length, self.start_max = int(task["count_length"]), int(task["start_max"])

    def count(self, start: int) -> str:
        return ", ".join(str(i) for i in range(start, start + self.length))

    def prompt(self, start: int) -> str:
        return (f"Pick one common noun and write it, then count from {start} to {start + self.length - 1}, "
                "then write the same noun again.")

    def trace(self, item: str, start: int) -> str:
        return f"Noun: {item}. {self.count(start)}. Again: {item}."

    def rows(self, n: int, seed: str) -> list[dict]:
        """`n` fresh rows (a uniform noun, a uniform start), as the trainer reads them."""
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            item, start = rng.choice(self.items), rng.randint(1, self.start_max)
            out.append({"prompt": self.prompt(start), "answer": item, "start": start,
                        "solution": self.trace(item, start)})
        return out

    def check(self, text: str, start: int) -> tuple[bool, bool, str | None]:
        """(formatted: the exact format, the right count and a listed noun; correct: formatted and the
        same noun again; the noun it picked, if any)."""
        m = re.fullmatch(rf"Noun: (\w+)\. {re.escape(self.count(start))}\. Again: (\w+)\.", text.strip())
        if m is None:
            head = re.match(r"Noun: (\w+)", text.strip())
            return False, False, head.group(1) if head else None
        formatted = m.group(1) in self.items
        return formatted, formatted and m.group(1) == m.group(2), m.group(1)

    def validate(self, tokenizer, window: int, evict_block: int) -> int:
        """Refuse a task the experiment cannot measure: every noun one token (with its leading
        space) that never occurs in a prompt or filler, and evicted >= one window before it is
        repeated. Returns the distance in tokens from the noun to its repetition."""
        for item in self.items:
            if len(tokenizer.encode(" " + item, add_special_tokens=False)) != 1:
                raise SystemExit(f"error: recall-words: item {item!r} is not one token: choose single-token "
                                 "nouns")
        ids = {tokenizer.encode(" " + item, add_special_tokens=False)[0] for item in self.items}
        distances = set()
        for start in range(1, self.start_max + 1):
            trace = tokenizer.encode(self.trace(self.items[0], start), add_special_tokens=False)
            first, last = (i for i, t in enumerate(trace) if t in ids)
            others = set(tokenizer.encode(self.prompt(start), add_special_tokens=False)) | set(trace)
            if len(others & ids) != 1:
                raise SystemExit("error: recall-words: an item occurs in a prompt or in the filler; "
                                 "change the items")
            events = range(window, len(trace), evict_block)
            out = next((s for s in events if s - window + evict_block > first), None)
            if out is None or last < out + window:
                raise SystemExit(f"error: recall-words: with window {window} the noun is not evicted a "
                                 f"whole window before it is repeated (start {start}); lengthen the filler "
                                 "or shrink the window")
            distances.add(last - first)
        return min(distances)


def answer_positions(policy: Policy, task: WordRecall, rows: list[dict]) -> tuple[list, list, list[int]]:
    """Prompt ids, target ids (as SFTTrainer builds them: the trace + EOS) and the index of the
    repeated noun in each target."""
    prompts = policy.encode([r["prompt"] for r in rows])
    tok = policy.tokenizer
    targets = [tok.encode(r["solution"], add_special_tokens=False) + [tok.eos_token_id] for r in rows]
    noun = [tok.encode(" " + r["answer"], add_special_tokens=False)[0] for r in rows]
    where = [max(i for i, t in enumerate(ids) if t == n) for ids, n in zip(targets, noun, strict=True)]
    return prompts, targets, where


@torch.no_grad()
def answer_nll(policy: Policy, task: WordRecall, rows: list[dict], batch: int) -> list[float]:
    """NLL (nats) of the repeated noun in each held-out trace, teacher-forced under the policy's cache."""
    prompts, targets, where = answer_positions(policy, task, rows)
    out = []
    for a in range(0, len(rows), batch):
        lps = policy.replay_logprobs(prompts[a : a + batch], targets[a : a + batch],
                                     policy.eviction_logs(prompts[a : a + batch], targets[a : a + batch]))
        out += [-float(lp[j]) for lp, j in zip(lps, where[a : a + batch], strict=True)]
    return out


@torch.no_grad()
def sample_checks(policy: Policy, task: WordRecall, rows: list[dict], ev: dict) -> list[tuple]:
    """Sample a completion per row at the eval temperature; the checker's verdict on each."""
    max_new = max(len(policy.tokenizer.encode(r["solution"], add_special_tokens=False)) for r in rows) + 8
    checks = []
    for a in range(0, len(rows), ev["batch"]):
        part = rows[a : a + ev["batch"]]
        res = policy.generate([r["prompt"] for r in part], max_new_tokens=max_new,
                              temperature=ev["temperature"], seed=ev["seed"] + a)
        checks += [task.check(text, r["start"]) for text, r in zip(res.texts, part, strict=True)]
    return checks


def run_arm(arm: str, settings: dict, out: Path, log_path: Path) -> dict:
    """Train (or load) one arm, then its learning curve, held-out answer NLLs and samples."""
    log, task, ev = Log(log_path), WordRecall(settings["task"]), settings["eval"]
    torch.manual_seed(settings["seed"])
    config = arm_config(settings, arm, out / arm, out / "train.jsonl")
    policy = train_arm(config, log, f"{NAME} {arm}")
    heldout = task.rows(ev["heldout"], f"heldout:{settings['seed']}")
    curve = []
    for path in list_checkpoints(out / arm / "checkpoints"):
        ckpt = Policy.from_pretrained(adapter_path=str(path / ADAPTER_DIR), cache=config.cache)
        nll = answer_nll(ckpt, task, heldout, ev["batch"])
        curve.append((int(path.name.split("-")[1]), sum(nll) / len(nll)))
        del ckpt
    nll = answer_nll(policy, task, heldout, ev["batch"])
    checks = sample_checks(policy, task, task.rows(ev["samples"], f"eval:{settings['seed']}"), ev)
    acc = sum(c[1] for c in checks) / len(checks)
    log(f"{NAME} {arm}: accuracy {acc:.3f} (n={len(checks)}), answer NLL {sum(nll) / len(nll):.3f}, curve "
        + " ".join(f"{s}:{v:.2f}" for s, v in curve))
    return {"curve": curve, "nll": nll, "checks": checks}


def entropy_bits(items: list[str]) -> float:
    counts, total = Counter(items), len(items)
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def arm_rows(arm: str, res: dict, k_items: int) -> list[dict]:
    checks, nll = res["checks"], torch.tensor(res["nll"])
    n, k = len(checks), sum(c[1] for c in checks)
    formatted = sum(c[0] for c in checks)
    info = math.log(k_items) - nll
    return [row(arm, "accuracy", k / n, n, wilson_interval(k, n)),
            row(arm, "format_rate", formatted / n, n, wilson_interval(formatted, n)),
            row(arm, "item_entropy_bits", entropy_bits([c[2] for c in checks if c[0]]), formatted),
            row(arm, "recall_info_nats", info.mean().item(), len(info),
                bootstrap_interval(lambda i: info[i].mean().item(), len(info)))]


def difference_rows(a: str, b: str, results: dict, k_items: int) -> list[dict]:
    """`a` - `b`: accuracy (Newcombe), recall information (paired bootstrap: the same held-out traces)."""
    ka, na = sum(c[1] for c in results[a]["checks"]), len(results[a]["checks"])
    kb, nb = sum(c[1] for c in results[b]["checks"]), len(results[b]["checks"])
    gap = torch.tensor(results[b]["nll"]) - torch.tensor(results[a]["nll"])  # info(a) - info(b), per trace
    return [row(f"{a}-{b}", "accuracy", ka / na - kb / nb, min(na, nb), newcombe_interval(ka, na, kb, nb)),
            row(f"{a}-{b}", "recall_info_nats", gap.mean().item(), len(gap),
                bootstrap_interval(lambda i: gap[i].mean().item(), len(gap)))]


def criteria(rows: list[dict], settings: dict) -> dict[str, bool]:
    """The success criteria stated in the config, checked against the rows (empty when a variant's
    run lacks the arms they compare)."""
    c, get = settings["criteria"], {(r["method"], r["metric"]): r for r in rows}
    diff = get.get((f"{c['method']}-{c['baseline']}", "accuracy"))
    if diff is None:
        return {}
    trained = [a for a, o in settings["arms"].items() if (o or {}).get("adapter", {}).get("mode") != "none"]
    k = len(settings["task"]["items"])
    return {
        "accuracy_gain": diff["value"] >= c["min_accuracy_gain"] and diff["lo"] > 0,
        "format": all(get[(a, "format_rate")]["value"] >= c["min_format_rate"] for a in trained),
        "entropy": all(get[(a, "item_entropy_bits")]["value"] >= math.log2(k) - c["max_entropy_gap_bits"]
                       for a in trained),
    }


def run(settings: dict, out: Path, log: Log) -> dict:
    task = WordRecall(settings["task"])
    cache = CacheConfig(window=settings["window"], evict_ratio=settings["evict_ratio"])
    tokenizer = Policy.from_pretrained(settings["train"].get("model", "default")).tokenizer
    distance = task.validate(tokenizer, cache.window, cache.evict_block)
    steps, batch = settings["train"]["max_steps"], settings["train"]["prompts_per_step"]
    rows = task.rows(steps * batch, f"train:{settings['seed']}")
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    events = len(default_schedule(distance + 8, cache))
    log(f"{NAME}: K={len(task.items)} items, D>={distance} tokens from the noun to its repetition, window "
        f"{cache.window} (E={cache.evict_block}, {events} events up to the repetition), {len(rows)} fresh "
        "training traces")
    results = run_arms(run_arm, list(settings["arms"]), settings["workers"], settings, out, log.path)
    k = len(task.items)
    table = [r for arm, res in results.items() for r in arm_rows(arm, res, k)]
    for a, b in settings["differences"]:
        table += difference_rows(a, b, results, k)
    return {"name": NAME, "window": settings["window"], "evict_ratio": settings["evict_ratio"], "items": k,
            "chance": 1 / k, "distance": distance, "settings": settings, "rows": table,
            "curves": {arm: res["curve"] for arm, res in results.items() if res["curve"]},
            "criteria": criteria(table, settings)}
