"""Small-scale replication of the PTE claim on delayed recall, through the shipped trainers. One command:

    python benchmarks/replication/run.py [--config overrides.json] [--base BASE_DIR] [--out DIR]

1. trains a tiny Llama from scratch on full-cache traces of the `recall` task (`thoughtfold.tasks.recall`)
   and saves it, with the task's word-level tokenizer, as an ordinary HF model directory
   (`<out>/base`: `thoughtfold generate --model <out>/base ...` works on it);
2. evaluates it with the full cache and with bounded caches W in {D/8, D/4, D/2} (no adaptation);
3. trains LoRA_c and PTE under each bounded cache, and the PTE ablations at W = D/4, each job with
   `thoughtfold.SFTTrainer` (cross-entropy through the replay on full-cache traces, data
   `recall:steps=N`) and then `thoughtfold.GRPOTrainer` (reward `recall`; the early value is kept
   out of the loss by the data's `loss_mask_prefix`) with the library's defaults unless the config
   below says otherwise -- in 2 worker processes;
4. writes `results.json` (rows: method, window, accuracy, n, 95% Wilson interval, peak memory, ...)
   and `RESULTS.md` (the table) next to this file, logs to `<out>/log.txt`, each job's trainer
   output (metrics.jsonl, checkpoints, adapter) under `<out>/jobs/`.

Accuracy is measured on `eval.n` fixed prompts, sampling at temperature 1 (the early value must be
sampled: a greedy policy always picks the same value, which makes recall unnecessary); every row
reports the value's entropy as a guard against a policy that collapses the value.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import random
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

from thoughtfold import GRPOTrainer, SFTTrainer
from thoughtfold.config import AdapterConfig, CacheConfig, DataConfig, TrainConfig
from thoughtfold.evaluation.bench.memory import PeakMemory
from thoughtfold.evaluation.intervals import wilson_interval
from thoughtfold.policy import Policy
from thoughtfold.tasks.recall import BOS, EOS, PAD, RecallTask, recall_tokenizer
from thoughtfold.training.metrics import read_metrics

HERE = Path(__file__).resolve().parent

DEFAULT_CONFIG: dict = {
    "seed": 0,
    "task": {"steps": 31, "combine": "copy"},
    "model": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 4},
    "pretrain": {"batch": 64, "lr": 3e-3, "max_steps": 1500, "eval_every": 100, "eval_n": 200,
                 "target": 0.97},
    "adapter": {"rank": 16, "alpha": 32.0, "global_tokens": 16},
    # TrainConfig fields of each stage (the rest are the library's defaults)
    "sft": {"max_steps": 160, "per_step": 32, "learning_rate": 2e-3},
    "grpo": {"max_steps": 10, "num_generations": 8, "per_step": 8,
             "learning_rate": 1e-4},  # 5e-4 hurt saturated policies (RESULTS.md)
    # other TrainConfig fields of both stages (e.g. encoder_lr_ratio); the library's defaults otherwise
    "train": {},
    "data_rows": 4096,
    "eval": {"n": 500, "batch": 250, "seed": 1234},
    "windows": None,  # default [D/8, D/4, D/2]
    # at every window: PTE (the library default, backprop "state") and LoRA_c
    "methods": ["pte", "lora_c"],
    # at ablation_window, with the base SFT budget: truncated vs full backprop, then the encoder
    # ablations on top of full backprop
    "ablations": ["pte_truncated", "pte_full_backprop", "pte_fb_global0", "pte_fb_global_only",
                  "pte_fb_paper_update"],
    "ablation_window": None,  # default D/4
    "sft_multiplier": {"pte": 3},  # methods trained for k x sft steps (each row records its sft_steps)
    "row_suffix": "",  # appended to the method names of the rows (variants with other settings)
    # explicit [[method, window], ...] (a priority order); default: methods x windows, ablations
    "jobs": None,
    # a method may name an eviction policy: "pte@h2o" trains and evaluates PTE under cache.eviction=h2o
    "bounded_evictions": ["oldest"],  # the "bounded, no adaptation" reference rows, one per policy
    "workers": 2,  # training jobs run in this many processes (one torch thread each)
    "memory_probe": 8,
}

# toy scale for the smoke test: seconds, not minutes
QUICK_CONFIG: dict = {
    "task": {"steps": 5, "combine": "copy"},
    "model": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 2, "num_key_value_heads": 2},
    "pretrain": {"batch": 16, "lr": 3e-3, "max_steps": 4, "eval_every": 2, "eval_n": 8, "target": 1.1},
    "adapter": {"rank": 4, "alpha": 8.0, "global_tokens": 2},
    "sft": {"max_steps": 2, "per_step": 4, "learning_rate": 1e-3},
    "grpo": {"max_steps": 1, "num_generations": 2, "per_step": 2, "learning_rate": 1e-4},
    "data_rows": 64,
    "eval": {"n": 8, "batch": 8, "seed": 1},
    "memory_probe": 2,
    "workers": 1,
}

METHODS = {  # name -> (adapter mode, adapter overrides, TrainConfig.backprop)
    "lora_c": ("lora", {}, "state"),  # (LoRA has no encoder states: backprop changes nothing)
    "pte": ("pte", {}, "state"),  # the library default
    "pte_truncated": ("pte", {}, "truncated"),
    "pte_full_backprop": ("pte", {}, "full"),
    # ablations, on top of full backprop (it learns within the base SFT budget; see RESULTS.md)
    "pte_fb_global0": ("pte", {"global_tokens": 0}, "full"),
    "pte_fb_global_only": ("pte", {"global_only": True}, "full"),
    "pte_fb_paper_update": ("pte", {"state_update": "paper"}, "full"),
    # the two adapter updates side by side, whatever the library's default: A (I + S) B and A S B
    "pte_residual": ("pte", {"residual": True}, "state"),
    "pte_paper_form": ("pte", {"residual": False}, "state"),
}


def merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in override.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class Log:
    def __init__(self, path: Path | None):
        self.file = open(path, "a") if path else None  # noqa: SIM115 (closed at exit)

    def __call__(self, msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        if self.file:
            self.file.write(line + "\n")
            self.file.flush()


# --------------------------------------------------------------------------- the base model


def build_model(task: RecallTask, cfg: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=task.vocab_size, max_position_embeddings=4 * task.completion_length,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False,
                         **cfg)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


def save_base(model, task: RecallTask, directory: Path) -> None:
    """The pretrained model and the task's tokenizer as an HF model directory."""
    model.save_pretrained(directory)
    recall_tokenizer(task).save_pretrained(directory)


def pretrain(model, task: RecallTask, cfg: dict, ecfg: dict, seed: int, log: Log) -> dict:
    """Full-parameter teacher forcing on full-cache traces (fresh random traces every step) until the
    full-cache accuracy reaches `target` or `max_steps`."""
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    plen = 3
    history, step, start = [], 0, time.perf_counter()
    acc = 0.0
    while step < cfg["max_steps"]:
        model.train()
        prompts, traces = task.sample_traces(cfg["batch"], seed=seed * 1_000_003 + step)
        ids = torch.tensor([p + t for p, t in zip(prompts, traces, strict=True)])
        labels = ids.clone()
        labels[:, :plen] = -100
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        step += 1
        if step % cfg["eval_every"] == 0 or step == cfg["max_steps"]:
            model.eval()
            policy = Policy(copy.deepcopy(model), None, cache=CacheConfig(window=None))
            res = evaluate(policy, task, cfg["eval_n"], ecfg["batch"], seed=seed + step)
            acc = res["accuracy"]
            history.append({"step": step, "loss": round(loss.item(), 4), "accuracy": acc})
            log(f"pretrain step {step} loss {loss.item():.4f} full-cache acc {acc:.3f} "
                f"chain {res['chain_accuracy']:.3f} ({time.perf_counter() - start:.0f}s)")
            if acc >= cfg["target"]:
                break
    model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - start, 1), "final_accuracy": acc,
            "history": history}


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(policy: Policy, task: RecallTask, n: int, batch: int, seed: int) -> dict:
    """Sample (temperature 1) on `n` fixed prompts; strict check of every trace."""
    prompts = task.sample_prompts(n, seed)
    checks = []
    for i in range(0, n, batch):
        out = policy.generate(prompts[i : i + batch], max_new_tokens=task.completion_length, temperature=1.0,
                              seed=seed + i, chat_template=False)
        checks += [task.check(p, c) for p, c in zip(out.prompt_ids, out.completion_ids, strict=True)]
    k = sum(c.correct for c in checks)
    chain = [c for c in checks if c.chain_ok]
    values = Counter(c.value for c in checks if c.value is not None)
    total = sum(values.values())
    entropy = -sum(v / total * math.log2(v / total) for v in values.values()) if total else 0.0
    lo, hi = wilson_interval(k, n)
    return {
        "accuracy": k / n, "n": n, "ci95": [round(lo, 4), round(hi, 4)],
        "chain_accuracy": len(chain) / n,
        "recall_accuracy": (sum(c.correct for c in chain) / len(chain)) if chain else 0.0,
        "value_entropy_bits": round(entropy, 3),
    }


def measure_memory(policy: Policy, task: RecallTask, probe: int, train: bool,
                   backprop: str = "state") -> dict:
    """Peak tensor bytes (CPU) of one rollout and one replay+backward on `probe` sequences."""
    prompts, traces = task.sample_traces(probe, seed=777)
    with PeakMemory("cpu") as m:
        policy.generate(prompts, max_new_tokens=task.completion_length, temperature=1.0, seed=0,
                        chat_template=False)
    out = {"rollout_peak_bytes": m.peak_bytes, "train_peak_bytes": None}
    if train:
        total = sum(map(len, traces))
        with PeakMemory("cpu") as m:
            policy.replay_logprobs(prompts, traces, loss_fn=lambda lp, a, b, rows: -lp.sum() / total,
                                   backprop=backprop)
        for p in policy.trainable_parameters():
            p.grad = None
        out["train_peak_bytes"] = m.peak_bytes
    return out


# --------------------------------------------------------------------------- the experiment


def run(config: dict, out_dir: Path, results_path: Path | None, table_path: Path | None) -> dict:
    if "OMP_NUM_THREADS" not in os.environ:  # pretraining and the reference rows; jobs use one thread each
        torch.set_num_threads(max(1, config["workers"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    log = Log(out_dir / "log.txt")
    seed = config["seed"]
    random.seed(seed)
    task = RecallTask(**config["task"])
    d = task.distance
    windows = config["windows"] or [d // 8, d // 4, d // 2]
    abl_window = config["ablation_window"] or d // 4
    ecfg = config["eval"]
    t0 = time.perf_counter()
    log(f"task: delayed recall, D={d}, completion {task.completion_length} tokens, windows {windows}")

    base_dir = out_dir / "base"
    if config.get("base_path"):  # reuse a base model trained by an earlier run of this script
        base_dir = Path(config["base_path"])
        pre = {"loaded_from": str(base_dir)}
        log(f"base model: {base_dir}")
    else:
        base = build_model(task, config["model"], seed)
        log(f"model: Llama {config['model']} -> "
            f"{sum(p.numel() for p in base.parameters()) / 1e6:.2f}M parameters")
        pre = pretrain(base, task, config["pretrain"], ecfg, seed, log)
        save_base(base, task, base_dir)
        log(f"base model saved to {base_dir}")

    rows: list[dict] = []

    def make(window: int | None, mode: str, eviction: str = "oldest") -> Policy:
        acfg = AdapterConfig(mode=mode, **config["adapter"])
        return Policy.from_pretrained(str(base_dir), cache=CacheConfig(window=window, eviction=eviction),
                                      adapter=acfg)

    def add(method: str, window: int | None, policy: Policy, extra: dict) -> None:
        res = evaluate(policy, task, ecfg["n"], ecfg["batch"], ecfg["seed"])
        rows.append({"method": method, "window": window, **res, **extra})
        log(row_line(rows[-1]))

    # reference rows: full cache (its training memory: a LoRA replay step under the full cache)
    probe = config["memory_probe"]
    full = make(None, "lora")
    adapter_params = sum(p.numel() for p in full.trainable_parameters())
    n_params = sum(p.numel() for p in full.model.parameters()) - adapter_params
    add("full", None, full, measure_memory(full, task, probe, train=True))
    for w in windows:
        for eviction in config["bounded_evictions"]:
            bounded = make(w, "none", eviction)
            name = "bounded" if eviction == "oldest" else f"bounded@{eviction}"
            add(name, w, bounded, measure_memory(bounded, task, probe, train=False))
    write(config, task, n_params, pre, rows, time.perf_counter() - t0, results_path, table_path)

    jobs = [(m, w) for m in config["methods"] for w in windows]
    jobs += [(a, abl_window) for a in config["ablations"]]
    if config.get("jobs"):
        jobs = [(m, int(w)) for m, w in config["jobs"]]
    log(f"{len(jobs)} training jobs on {config['workers']} worker(s), "
        f"{time.perf_counter() - t0:.0f}s elapsed")
    done: dict[int, dict] = {}
    reference = list(rows)

    def finished(k: int, row: dict) -> None:
        done[k] = row
        rows[:] = reference + [done[i] for i in sorted(done)]  # job order, whatever the finishing order
        log(f"{row_line(row)} ({len(done)}/{len(jobs)} jobs, {time.perf_counter() - t0:.0f}s elapsed)")
        write(config, task, n_params, pre, rows, time.perf_counter() - t0, results_path, table_path)

    job_args = [(config, base_dir, method, w, out_dir) for method, w in jobs]
    if config["workers"] <= 1:
        for k, args in enumerate(job_args):
            finished(k, train_job(*args))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(config["workers"], mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(train_job, *args): k for k, args in enumerate(job_args)}
            for future in as_completed(futures):
                finished(futures[future], future.result())
    log(f"done in {time.perf_counter() - t0:.0f}s")
    return write(config, task, n_params, pre, rows, time.perf_counter() - t0, results_path, table_path)


def row_line(row: dict) -> str:
    return (f"ROW {row['method']:18s} W={row['window']!s:5s} acc {row['accuracy']:.3f} {row['ci95']} chain "
            f"{row['chain_accuracy']:.3f} H(v) {row['value_entropy_bits']:.2f} "
            f"rollout {row['rollout_peak_bytes'] / 1e6:.2f}MB "
            f"train {(row.get('train_peak_bytes') or 0) / 1e6:.2f}MB")


def train_configs(config: dict, base_dir: Path, method: str, window: int,
                  job_dir: Path) -> tuple[TrainConfig, TrainConfig]:
    """The SFT and the GRPO TrainConfig of one job: the library's defaults, plus the task, the
    adapter, the window and the stage's budget from `config`."""
    base_method, _, eviction = method.partition("@")
    mode, overrides, backprop = METHODS[base_method]
    task = RecallTask(**config["task"])
    s, g = config["sft"], config["grpo"]
    sft = TrainConfig(
        model=str(base_dir), cache=CacheConfig(window=window, eviction=eviction or "oldest"),
        adapter=AdapterConfig(mode=mode, **{**config["adapter"], **overrides}),
        data=DataConfig(dataset=f"recall:steps={task.steps},combine={task.combine},n={config['data_rows']}",
                        chat_template=False),
        rewards=["recall"], backprop=backprop, max_completion_length=task.completion_length, temperature=1.0,
        max_steps=s["max_steps"] * config["sft_multiplier"].get(base_method, 1),
        prompts_per_step=s["per_step"],
        learning_rate=s["learning_rate"], warmup_steps=0, save_steps=0, seed=config["seed"],
        output_dir=str(job_dir / "sft"), overwrite_output_dir=True, progress=False, **config["train"])
    grpo = replace(sft, max_steps=g["max_steps"], num_generations=g["num_generations"],
                   prompts_per_step=g["per_step"], learning_rate=g["learning_rate"],
                   output_dir=str(job_dir / "grpo"))
    return sft, grpo


def train_job(config: dict, base_dir: Path, method: str, window: int, out_dir: Path) -> dict:
    """One training row: the adapter of `method` under `window`, trained by SFTTrainer then
    GRPOTrainer, evaluated after each. Runs in a worker process (or inline with one worker)."""
    torch.set_num_threads(1)
    log = Log(out_dir / "log.txt")
    ecfg = config["eval"]
    task = RecallTask(**config["task"])
    name = method + config.get("row_suffix", "")
    job_dir = out_dir / "jobs" / f"{name}-W{window}"
    sft_cfg, grpo_cfg = train_configs(config, base_dir, method, window, job_dir)
    log(f"== {name} W={window} starts ({sft_cfg.max_steps} SFT steps, backprop {sft_cfg.backprop})")
    start = time.perf_counter()
    sft = SFTTrainer(args=sft_cfg)
    policy = sft.policy
    extra = {"adapter_mode": sft_cfg.adapter.mode, "adapter": sft_cfg.adapter.to_dict(),
             "backprop": sft_cfg.backprop,
             **measure_memory(policy, task, config["memory_probe"], train=True, backprop=sft_cfg.backprop)}
    sft.train()
    sft_log = read_metrics(Path(sft_cfg.output_dir) / "metrics.jsonl")
    tail = [r["loss"] for r in sft_log[-10:]]
    extra.update({"sft_steps": sft_cfg.max_steps, "sft_seconds": round(time.perf_counter() - start, 1),
                  "sft_final_nll": round(sum(tail) / len(tail), 4)})
    extra["accuracy_after_sft"] = evaluate(policy, task, ecfg["n"], ecfg["batch"], ecfg["seed"])["accuracy"]
    log(f"  {name} W={window} accuracy after SFT {extra['accuracy_after_sft']:.3f} "
        f"(nll {extra['sft_final_nll']:.4f}, {extra['sft_seconds']:.0f}s)")
    if grpo_cfg.max_steps > 0:
        grpo_start = time.perf_counter()
        GRPOTrainer(policy, args=grpo_cfg).train()
        rewards = [r["reward"] for r in read_metrics(Path(grpo_cfg.output_dir) / "metrics.jsonl")]
        extra.update({"grpo_steps": len(rewards), "grpo_seconds": round(time.perf_counter() - grpo_start, 1),
                      "grpo_reward_first": rewards[0],
                      "grpo_reward_last5": sum(rewards[-5:]) / len(rewards[-5:])})
        log(f"  {name} W={window} grpo reward first {rewards[0]:.3f} last5 {extra['grpo_reward_last5']:.3f}")
    extra["job_seconds"] = round(time.perf_counter() - start, 1)
    res = evaluate(policy, task, ecfg["n"], ecfg["batch"], ecfg["seed"])
    return {"method": name, "window": window, **res, **extra}


def write(config: dict, task: RecallTask, n_params: int, pre: dict, rows: list[dict], seconds: float,
          results_path: Path | None, table_path: Path | None) -> dict:
    results = {
        "task": {"name": "delayed_recall", "combine": task.combine, "D": task.distance, "chance": task.chance,
                 "steps": task.steps, "prompt_tokens": 3, "completion_tokens": task.completion_length,
                 "vocab_size": task.vocab_size},
        "model": {"family": "llama", "parameters": n_params, **config["model"]},
        "pretrain": {k: v for k, v in pre.items() if k != "history"},
        "config": config,
        "rows": rows,
        "wall_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
    }
    if results_path is not None:
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    if table_path is not None:
        write_table(table_path, render_table(results))
    return results


BEGIN, END = "<!-- results table: generated by run.py -->", "<!-- end of results table -->"


def write_table(path: Path, table: str) -> None:
    """Put the table between the markers of an existing RESULTS.md (keeping the prose around it), or
    write a file with just the table."""
    block = f"{BEGIN}\n{table}{END}\n"
    text = path.read_text() if path.is_file() else ""
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = block
    path.write_text(text)


def merge_rows(results_path: Path, extra: list[Path]) -> dict:
    """Append the training rows of other runs' results.json (same task and base) to `results_path`
    and re-render the table: used for variants run after the main command (other settings, same base)."""
    results = json.loads(results_path.read_text())
    have = {(r["method"], r["window"]) for r in results["rows"]}
    for path in extra:
        other = json.loads(path.read_text())
        if other["task"] != results["task"]:
            raise SystemExit(f"{path}: a different task, not merged")
        for r in other["rows"]:
            if (r["method"], r["window"]) not in have:
                results["rows"].append({**r, "from": str(path)})
                have.add((r["method"], r["window"]))
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    write_table(results_path.with_name("RESULTS.md"), render_table(results))
    return results


def render_table(results: dict) -> str:
    t = results["task"]
    lines = [
        f"Delayed recall, D = {t['D']} tokens, chance = {t['chance']:.2f}; tiny Llama "
        f"({results['model']['parameters'] / 1e6:.2f}M parameters) trained from scratch; accuracy = strict "
        "trace check, sampled at temperature 1 on n prompts, 95% Wilson interval. Peak memory = tensor bytes "
        f"of one rollout / one replay+backward on {results['config']['memory_probe']} sequences (CPU).",
        "",
        "| method | window | accuracy | 95% CI | n | SFT steps | after SFT | chain ok | H(value) bits "
        "| rollout peak | train peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    order = ["full", "bounded", *METHODS]

    def key(r: dict) -> tuple:
        rank = order.index(r["method"]) if r["method"] in order else len(order)
        return (r["window"] is not None, r["window"] or 0, rank, r["method"])

    for r in sorted(results["rows"], key=key):
        w = "full" if r["window"] is None else str(r["window"])
        sft_acc = "" if "accuracy_after_sft" not in r else f"{r['accuracy_after_sft']:.3f}"
        train = "" if r.get("train_peak_bytes") is None else f"{r['train_peak_bytes'] / 2**20:.2f} MiB"
        lines.append(
            f"| {r['method']} | {w} | {r['accuracy']:.3f} | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
            f"| {r['n']} | {r.get('sft_steps', '')} | {sft_acc} | {r['chain_accuracy']:.3f} "
            f"| {r['value_entropy_bits']:.2f} | {r['rollout_peak_bytes'] / 2**20:.2f} MiB | {train} |")
    lines.append("")
    return "\n".join(lines)


SUMMARY_NAMES = {
    "full": "full cache (reference)",
    "bounded": "bounded cache, no adaptation",
    "lora_c": "LoRA_c",
    "pte": "**PTE** (library defaults: `backprop: state`), 3x SFT steps + GRPO",
    "pte_truncated": "PTE, `backprop: truncated`",
    "pte_full_backprop": "PTE, `backprop: full`",
    "pte_fb_global0": "ablation: no global tokens (full backprop)",
    "pte_fb_global_only": "ablation: global tokens only (full backprop)",
    "pte_fb_paper_update": "ablation: paper-literal state update (full backprop)",
}


def summary_table(results: dict) -> str:
    """The README's table: accuracy per method and window, and the training peak at D/4."""
    d = results["task"]["D"]
    windows = sorted({r["window"] for r in results["rows"] if r["window"] is not None})
    names = [f"W = {w} (D/{d // w})" if d % w == 0 else f"W = {w}" for w in windows]
    lines = [f"| method | {' | '.join(names)} | train peak (W = {d // 4}) |",
             "|---" * (len(windows) + 2) + "|"]
    for method, label in SUMMARY_NAMES.items():
        rows = {r["window"]: r for r in results["rows"] if r["method"] == method}
        if not rows:
            continue
        cells = [f"{rows[None]['accuracy']:.3f}"] * len(windows) if None in rows else [
            f"{rows[w]['accuracy']:.3f}" if w in rows else "" for w in windows]
        peak = (rows.get(d // 4) or rows.get(None) or {}).get("train_peak_bytes")
        lines.append(f"| {label} | {' | '.join(cells)} | {'-' if not peak else f'{peak / 2**20:.1f} MiB'} |")
    return "\n".join(lines) + "\n"


README_BEGIN, README_END = "<!-- replication table: run.py --readme -->", "<!-- end of replication table -->"


def write_readme_table(readme: Path, results: dict) -> None:
    """Replace the table between the README's markers with :func:`summary_table`."""
    text = readme.read_text()
    if README_BEGIN not in text or README_END not in text:
        raise SystemExit(f"{readme}: no {README_BEGIN} ... {README_END} markers")
    head, rest = text.split(README_BEGIN, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(f"{head}{README_BEGIN}\n{summary_table(results)}{README_END}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=None, help="JSON overrides of the default config")
    ap.add_argument("--quick", action="store_true", help="toy scale (seconds): a smoke test of the pipeline")
    ap.add_argument("--out", type=Path, default=HERE / "runs" / "latest",
                    help="logs, checkpoints, base model")
    ap.add_argument("--results", type=Path, default=None, help="default: results.json next to this script")
    ap.add_argument("--base", type=Path, default=None, help="skip pretraining: use this base model directory")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="only merge the rows of these results.json files into --results "
                    "(default results.json)")
    ap.add_argument("--readme", type=Path, default=None,
                    help="only rewrite the summary table in this README from --results "
                    "(default results.json)")
    args = ap.parse_args(argv)
    if args.readme:
        write_readme_table(args.readme, json.loads((args.results or HERE / "results.json").read_text()))
        return 0
    if args.merge:
        merge_rows(args.results or HERE / "results.json", args.merge)
        return 0
    config = merge(DEFAULT_CONFIG, QUICK_CONFIG) if args.quick else copy.deepcopy(DEFAULT_CONFIG)
    if args.config is not None:
        config = merge(config, json.loads(args.config.read_text()))
    if args.base is not None:
        config["base_path"] = str(args.base)
    results = args.results or (args.out / "results.json" if args.quick else HERE / "results.json")
    table = results.with_name("RESULTS.md")
    (args.out).mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    run(config, args.out, results, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
