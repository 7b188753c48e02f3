"""Small-scale replication of the PTE claim on delayed recall (issue 6). One command:

    python benchmarks/replication/run.py [--config overrides.json] [--base base_model.pt] [--out DIR]

1. trains a tiny Llama from scratch on full-cache traces of `thoughtfold.recall.RecallTask`;
2. evaluates it with the full cache and with bounded caches W in {D/8, D/4, D/2} (no adaptation);
3. trains LoRA_c and PTE (gradients through the encoder states, 3x the SFT steps) under each bounded
   cache -- supervised through the segment-wise replay on full-cache traces, then cache-aware GRPO
   (a minimal loop here, on `generate` + the replay) -- and the PTE ablations at W = D/4 (truncated
   and full backprop, global tokens, the paper-literal state update), in 2 worker processes;
4. writes `results.json` (rows: method, window, accuracy, n, 95% Wilson interval, peak memory, ...)
   and `RESULTS.md` (the table) next to this file, logs to `<out>/log.txt`.

Accuracy is measured on `eval.n` fixed prompts, sampling at temperature 1 (the early value must be
sampled: a greedy policy always picks the same value, which makes recall unnecessary). In GRPO the
early-value token is masked out of the loss, so the policy cannot collapse the value's distribution
to a constant (a shortcut that needs no recall); every row reports the value's entropy as a guard.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from thoughtfold.config import AdapterConfig, CacheConfig
from thoughtfold.memory import PeakMemory
from thoughtfold.policy import Policy
from thoughtfold.recall import BOS, EOS, PAD, RecallTask

HERE = Path(__file__).resolve().parent

DEFAULT_CONFIG: dict = {
    "seed": 0,
    "task": {"steps": 31, "combine": "copy"},
    "model": {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4,
              "num_attention_heads": 4, "num_key_value_heads": 4},
    "pretrain": {"batch": 64, "lr": 3e-3, "max_steps": 1500, "eval_every": 100, "eval_n": 200,
                 "target": 0.97},
    "adapter": {"rank": 16, "alpha": 32.0, "global_tokens": 16},
    "sft": {"steps": 160, "batch": 32, "lr": 2e-3},
    "grpo": {"steps": 10, "group_size": 8, "prompts_per_step": 8, "lr": 1e-4},  # 5e-4 hurt saturated policies (RESULTS.md)
    "eval": {"n": 500, "batch": 250, "seed": 1234},
    "windows": None,  # default [D/8, D/4, D/2]
    # at every window: PTE (with gradients through the states, the variant that reaches the goal, see
    # RESULTS.md) and LoRA_c
    "methods": ["pte", "lora_c"],
    # at ablation_window, with the base SFT budget: truncated vs full backprop, then the encoder
    # ablations on top of full backprop
    "ablations": ["pte_truncated", "pte_full_backprop", "pte_fb_global0", "pte_fb_global_only",
                  "pte_fb_paper_update"],
    "ablation_window": None,  # default D/4
    "sft_multiplier": {"pte": 3},  # methods trained for k x sft.steps (each row records its sft_steps)
    "row_suffix": "",  # appended to the method names of the rows (variants with other settings)
    "jobs": None,  # explicit [[method, window], ...] (a priority order); default: methods x windows, ablations
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
    "sft": {"steps": 2, "batch": 4, "lr": 1e-3},
    "grpo": {"steps": 1, "group_size": 2, "prompts_per_step": 2, "lr": 1e-4},
    "eval": {"n": 8, "batch": 8, "seed": 1},
    "memory_probe": 2,
    "workers": 1,
}

METHODS = {  # name -> (adapter mode, adapter overrides, backprop: False truncated | True full | "state")
    "lora_c": ("lora", {}, False),
    # exact gradients through the chain of encoder states, K/V detached, bounded activations
    # (replay state_backprop, trainer `backprop: state`)
    "pte": ("pte", {}, "state"),
    "pte_truncated": ("pte", {}, False),  # the engine's default backprop: earlier states detached
    "pte_full_backprop": ("pte", {}, True),
    # ablations, on top of full backprop (it learns within the base SFT budget; see RESULTS.md)
    "pte_fb_global0": ("pte", {"global_tokens": 0}, True),
    "pte_fb_global_only": ("pte", {"global_only": True}, True),
    "pte_fb_paper_update": ("pte", {"state_update": "paper"}, True),
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


# --------------------------------------------------------------------------- model


def build_model(task: RecallTask, cfg: dict, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=task.vocab_size, max_position_embeddings=4 * task.completion_length,
                         bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False,
                         **cfg)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()


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
    for p in model.parameters():
        p.requires_grad_(False)
    return {"steps": step, "seconds": round(time.perf_counter() - start, 1), "final_accuracy": acc,
            "history": history}


# --------------------------------------------------------------------------- evaluation


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return 0.0, 1.0
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def evaluate(policy: Policy, task: RecallTask, n: int, batch: int, seed: int) -> dict:
    """Sample (temperature 1) on `n` fixed prompts; strict check of every trace."""
    prompts = task.sample_prompts(n, seed)
    checks = []
    for i in range(0, n, batch):
        out = policy.generate(prompts[i : i + batch], max_new_tokens=task.completion_length, temperature=1.0,
                              seed=seed + i)
        checks += [task.check(p, c) for p, c in zip(out.prompt_ids, out.completion_ids, strict=True)]
    k = sum(c.correct for c in checks)
    chain = [c for c in checks if c.chain_ok]
    values = Counter(c.value for c in checks if c.value is not None)
    total = sum(values.values())
    entropy = -sum(v / total * math.log2(v / total) for v in values.values()) if total else 0.0
    lo, hi = wilson(k, n)
    return {
        "accuracy": k / n, "n": n, "ci95": [round(lo, 4), round(hi, 4)],
        "chain_accuracy": len(chain) / n,
        "recall_accuracy": (sum(c.correct for c in chain) / len(chain)) if chain else 0.0,
        "value_entropy_bits": round(entropy, 3),
    }


# --------------------------------------------------------------------------- replay with gradients through the states


def replay(policy: Policy, prompts, completions, logs, loss_fn, backprop: bool | str = False):
    """`policy.replay_logprobs` with backprop False (truncated, the engine default), True (one full
    graph) or "state" (exact gradients through the chain of encoder states, K/V detached)."""
    mode = "state" if backprop == "state" else "full" if backprop is True else "truncated"
    return policy.replay_logprobs(prompts, completions, logs, loss_fn=loss_fn, backprop=mode)


# --------------------------------------------------------------------------- training under the bounded cache


def sft_loss_fn(total_tokens: int):
    def loss_fn(lp: torch.Tensor, start: int, end: int) -> torch.Tensor:
        return -lp.sum() / total_tokens

    return loss_fn


def sft(policy: Policy, task: RecallTask, cfg: dict, seed: int, backprop: bool | str, log: Log, name: str) -> dict:
    """Cross-entropy through the replay on full-cache traces (pi^D imitates pi)."""
    params = policy.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    start, losses = time.perf_counter(), []
    for step in range(cfg["steps"]):
        prompts, traces = task.sample_traces(cfg["batch"], seed=seed * 7919 + step)
        opt.zero_grad(set_to_none=True)
        lps = replay(policy, prompts, traces, None, loss_fn=sft_loss_fn(sum(map(len, traces))),
                                     backprop=backprop)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        # answer-token NLL: the part of the loss that needs the evicted value
        ans = -torch.stack([lp[task.completion_length - 2] for lp in lps]).mean().item()
        losses.append((-torch.cat(lps).mean().item(), ans))
        if (step + 1) % max(1, cfg["steps"] // 5) == 0 or step == cfg["steps"] - 1:
            tail = losses[-10:]
            log(f"  {name} sft step {step + 1}/{cfg['steps']} nll {sum(x for x, _ in tail) / len(tail):.4f} "
                f"answer-nll {sum(a for _, a in tail) / len(tail):.3f} (ln10={math.log(10):.3f}) "
                f"({time.perf_counter() - start:.0f}s)")
    tail = losses[-10:]
    return {"sft_steps": cfg["steps"], "sft_seconds": round(time.perf_counter() - start, 1),
            "sft_final_nll": round(sum(x for x, _ in tail) / len(tail), 4),
            "sft_final_answer_nll": round(sum(a for _, a in tail) / len(tail), 4)}


def grpo(policy: Policy, task: RecallTask, cfg: dict, seed: int, backprop: bool | str, log: Log, name: str) -> dict:
    """Cache-aware GRPO, minimal: rollouts under the bounded cache (one lockstep `generate` call),
    group-normalised advantages (groups with zero reward spread dropped), token-level (DAPO)
    clipped policy-gradient loss through the segment-wise replay, one update per batch. The
    early-value token is masked out of the loss (see the module docstring). Written here rather than
    with `thoughtfold.trainer.GRPOTrainer` because that trainer was being rewritten while this ran."""
    params = policy.trainable_parameters()
    opt = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    g, eps = cfg["group_size"], cfg.get("epsilon", 0.2)
    start, rewards = time.perf_counter(), []
    for step in range(cfg["steps"]):
        prompts = [p for p in task.sample_prompts(cfg["prompts_per_step"], seed=seed * 104729 + step)
                   for _ in range(g)]
        out = policy.generate(prompts, max_new_tokens=task.completion_length, temperature=1.0,
                              seed=seed * 7 + step)
        r = torch.tensor(task.reward(prompts=out.prompt_ids, completion_ids=out.completion_ids)).view(-1, g)
        rewards.append(r.mean().item())
        std = r.std(-1, keepdim=True)
        keep = (std[:, 0] > 0).repeat_interleave(g).nonzero().flatten().tolist()
        if not keep:
            continue
        adv = ((r - r.mean(-1, keepdim=True)) / (std + 1e-4)).flatten()[keep]
        comps = [out.completion_ids[i] for i in keep]
        width = max(map(len, comps))
        old = torch.zeros(len(keep), width)
        mask = torch.zeros(len(keep), width)
        for j, i in enumerate(keep):
            old[j, : len(comps[j])] = torch.tensor(out.logprobs[i])
            mask[j, 1 : len(comps[j])] = 1.0  # token 0 (the early value) is not trained
        mask /= mask.sum()

        def loss_fn(lp, a, b, old=old, adv=adv, mask=mask):
            ratio = torch.exp(lp - old[:, a:b])
            per_token = -torch.min(ratio * adv[:, None], ratio.clamp(1 - eps, 1 + eps) * adv[:, None])
            return (per_token * mask[:, a:b]).sum()

        opt.zero_grad(set_to_none=True)
        replay(policy, [out.prompt_ids[i] for i in keep], comps, [out.eviction_log[i] for i in keep],
               loss_fn=loss_fn, backprop=backprop)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
    last = rewards[-5:]
    log(f"  {name} grpo {len(rewards)} steps reward first {rewards[0]:.3f} last5 {sum(last) / len(last):.3f} "
        f"({time.perf_counter() - start:.0f}s)")
    return {"grpo_steps": len(rewards), "grpo_seconds": round(time.perf_counter() - start, 1),
            "grpo_reward_first": rewards[0], "grpo_reward_last5": sum(last) / len(last)}


def measure_memory(policy: Policy, task: RecallTask, probe: int, train: bool, backprop: bool | str) -> dict:
    """Peak tensor bytes (CPU) of one rollout and one replay+backward on `probe` sequences."""
    prompts, traces = task.sample_traces(probe, seed=777)
    with PeakMemory("cpu") as m:
        policy.generate(prompts, max_new_tokens=task.completion_length, temperature=1.0, seed=0)
    out = {"rollout_peak_bytes": m.peak_bytes, "train_peak_bytes": None}
    if train:
        with PeakMemory("cpu") as m:
            replay(policy, prompts, traces, None, loss_fn=sft_loss_fn(sum(map(len, traces))),
                   backprop=backprop)
        for p in policy.trainable_parameters():
            p.grad = None
        out["train_peak_bytes"] = m.peak_bytes
    return out


# --------------------------------------------------------------------------- the experiment


def run(config: dict, out_dir: Path, results_path: Path | None, table_path: Path | None) -> dict:
    torch.set_num_threads(max(1, config["workers"]))  # pretraining and the reference rows; jobs use one each
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

    base = build_model(task, config["model"], seed)
    n_params = sum(p.numel() for p in base.parameters())
    log(f"model: Llama {config['model']} -> {n_params / 1e6:.2f}M parameters")
    if config.get("base_path"):  # reuse a base model trained by an earlier run of this script
        base.load_state_dict(torch.load(config["base_path"]))
        for p in base.parameters():
            p.requires_grad_(False)
        pre = {"loaded_from": str(config["base_path"])}
        log(f"base model loaded from {config['base_path']}")
    else:
        pre = pretrain(base, task, config["pretrain"], ecfg, seed, log)
    torch.save(base.state_dict(), out_dir / "base_model.pt")

    rows: list[dict] = []

    def add(method: str, window: int | None, policy: Policy, extra: dict) -> dict:
        res = evaluate(policy, task, ecfg["n"], ecfg["batch"], ecfg["seed"])
        row = {"method": method, "window": window, **res, **extra}
        rows.append(row)
        log(row_line(row))
        write(config, task, n_params, pre, rows, time.perf_counter() - t0, results_path, table_path)
        return row

    def make(window: int | None, mode: str, overrides: dict | None = None) -> Policy:
        acfg = AdapterConfig(mode=mode, **{**config["adapter"], **(overrides or {})})
        return Policy(copy.deepcopy(base), None, cache=CacheConfig(window=window), adapter=acfg)

    # reference rows: full cache (its training memory: a LoRA replay step under the full cache)
    probe = config["memory_probe"]
    full = make(None, "lora")
    add("full", None, full, measure_memory(full, task, probe, train=True, backprop=False))
    for w in windows:
        bounded = make(w, "none")
        add("bounded", w, bounded, measure_memory(bounded, task, probe, train=False, backprop=False))

    jobs = [(m, w) for m in config["methods"] for w in windows]
    jobs += [(a, abl_window) for a in config["ablations"]]
    if config.get("jobs"):
        jobs = [(m, int(w)) for m, w in config["jobs"]]
    log(f"{len(jobs)} training jobs on {config['workers']} worker(s), {time.perf_counter() - t0:.0f}s elapsed")
    done: dict[int, dict] = {}
    reference = list(rows)

    def finished(k: int, row: dict) -> None:
        done[k] = row
        rows[:] = reference + [done[i] for i in sorted(done)]  # job order, whatever the finishing order
        log(f"{row_line(row)} ({len(done)}/{len(jobs)} jobs, {time.perf_counter() - t0:.0f}s elapsed)")
        write(config, task, n_params, pre, rows, time.perf_counter() - t0, results_path, table_path)

    base_path = out_dir / "base_model.pt"
    if config["workers"] <= 1:
        for k, (method, w) in enumerate(jobs):
            finished(k, train_job(config, base_path, method, w, out_dir / "log.txt"))
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(config["workers"], mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = {pool.submit(train_job, config, base_path, method, w, out_dir / "log.txt"): k
                       for k, (method, w) in enumerate(jobs)}
            for future in as_completed(futures):
                finished(futures[future], future.result())
    log(f"done in {time.perf_counter() - t0:.0f}s")
    return write(config, task, n_params, pre, rows, time.perf_counter() - t0, results_path, table_path)


def row_line(row: dict) -> str:
    return (f"ROW {row['method']:18s} W={row['window']!s:5s} acc {row['accuracy']:.3f} {row['ci95']} chain "
            f"{row['chain_accuracy']:.3f} H(v) {row['value_entropy_bits']:.2f} "
            f"rollout {row['rollout_peak_bytes'] / 1e6:.2f}MB train {(row.get('train_peak_bytes') or 0) / 1e6:.2f}MB")


def train_job(config: dict, base_path: Path, method: str, window: int, log_path: Path) -> dict:
    """One training row: the adapter of `method` on the saved base model under `window`, SFT through the
    replay, then GRPO, evaluated after each. Runs in a worker process (or inline with one worker)."""
    torch.set_num_threads(1)
    log = Log(log_path)
    seed, ecfg = config["seed"], config["eval"]
    task = RecallTask(**config["task"])
    base = build_model(task, config["model"], seed)
    base.load_state_dict(torch.load(base_path))
    for p in base.parameters():
        p.requires_grad_(False)
    mode, overrides, full_bp = METHODS[method]
    k = config["sft_multiplier"].get(method, 1)
    name = method + config.get("row_suffix", "")
    log(f"== {name} W={window} starts")
    torch.manual_seed(seed)
    acfg = AdapterConfig(mode=mode, **{**config["adapter"], **overrides})
    policy = Policy(base, None, cache=CacheConfig(window=window), adapter=acfg)
    start = time.perf_counter()
    extra = {"adapter_mode": mode, "adapter_overrides": overrides, "backprop": full_bp,
             **measure_memory(policy, task, config["memory_probe"], train=True, backprop=full_bp)}
    sft_cfg = {**config["sft"], "steps": config["sft"]["steps"] * k}
    extra.update(sft(policy, task, sft_cfg, seed, full_bp, log, f"{name} W={window}"))
    extra["accuracy_after_sft"] = evaluate(policy, task, ecfg["n"], ecfg["batch"], ecfg["seed"])["accuracy"]
    log(f"  {name} W={window} accuracy after SFT {extra['accuracy_after_sft']:.3f}")
    if config["grpo"]["steps"] > 0:
        extra.update(grpo(policy, task, config["grpo"], seed, full_bp, log, f"{name} W={window}"))
    extra["job_seconds"] = round(time.perf_counter() - start, 1)
    res = evaluate(policy, task, ecfg["n"], ecfg["batch"], ecfg["seed"])
    return {"method": name, "window": window, **res, **extra}


def write(config: dict, task: RecallTask, n_params: int, pre: dict, rows: list[dict], seconds: float,
          results_path: Path | None, table_path: Path | None) -> dict:
    results = {
        "task": {"name": "delayed_recall", "combine": task.combine, "D": task.distance, "chance": task.chance, "steps": task.steps,
                 "prompt_tokens": 3, "completion_tokens": task.completion_length, "vocab_size": task.vocab_size},
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
        f"({results['model']['parameters'] / 1e6:.2f}M parameters) trained from scratch; accuracy = strict trace "
        f"check, sampled at temperature 1 on n prompts, 95% Wilson interval. Peak memory = tensor bytes of one "
        f"rollout / one replay+backward on {results['config']['memory_probe']} sequences (CPU).",
        "",
        "| method | window | accuracy | 95% CI | n | SFT steps | after SFT | chain ok | H(value) bits | rollout peak "
        "| train peak |",
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
            f"| {r['method']} | {w} | {r['accuracy']:.3f} | [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] | {r['n']} | "
            f"{r.get('sft_steps', '')} | {sft_acc} | {r['chain_accuracy']:.3f} | {r['value_entropy_bits']:.2f} | "
            f"{r['rollout_peak_bytes'] / 2**20:.2f} MiB | {train} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=None, help="JSON overrides of the default config")
    ap.add_argument("--quick", action="store_true", help="toy scale (seconds): a smoke test of the pipeline")
    ap.add_argument("--out", type=Path, default=HERE / "runs" / "latest", help="logs, checkpoints, base model")
    ap.add_argument("--results", type=Path, default=None, help="default: results.json next to this script")
    ap.add_argument("--base", type=Path, default=None, help="skip pretraining: load this base_model.pt")
    ap.add_argument("--merge", type=Path, nargs="+", default=None,
                    help="only merge the rows of these results.json files into --results (default results.json)")
    args = ap.parse_args(argv)
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
