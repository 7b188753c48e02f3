"""Dense self-distillation on GSM8K (`gsm8k-distill`): LoRA_c and PTE are trained by SFTTrainer with
`sft_loss: kl` to make the bundled model under a small window follow its own full-cache next-token
distributions on reference solutions (teacher-forced after the prompt: no generation), with the
same traces and budget. Each arm's checkpoint is chosen on held-out validation traces; on test
solutions we measure the KL to the full-cache model and the top-1 agreement on the tokens after the
first eviction, for the base model under the window, LoRA_c and PTE, and the paired bootstrap
interval of KL(PTE) - KL(LoRA_c) over the test traces.

Every setting is in `gsm8k-distill.yaml`; `run.py --set key=value` overrides any of them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from common import Log, arm_config, row, run_arms, train_arm

from thoughtfold.engine.replay import default_schedule
from thoughtfold.evaluation.fidelity import TokenFidelity, sequence_fidelity
from thoughtfold.evaluation.intervals import bootstrap_interval
from thoughtfold.policy import Policy
from thoughtfold.tasks.data import load_dataset_by_name
from thoughtfold.training.checkpoint import ADAPTER_DIR, list_checkpoints
from thoughtfold.training.distill import first_distilled_token, teacher_targets, token_kl

NAME = "gsm8k-distill"
_CALCULATOR = re.compile(r"<<[^>]*>>")


def solution_rows(settings: dict, split: str, start: int, n: int) -> list[dict]:
    """Problems [start, start + n) of the split with their reference solution as the SFT target
    (GSM8K's calculator annotations removed when `strip_calculator`), ending with the answer line."""
    d = settings["data"]
    rows = load_dataset_by_name(d["dataset"], split=split, limit=start + n)[start:]
    out = []
    for r in rows:
        text = str(r.get("solution") or "").strip()
        if d["strip_calculator"]:
            text = _CALCULATOR.sub("", text)
        out.append({"prompt": r["prompt"], "answer": r["answer"], "solution": f"{text}\n#### {r['answer']}"})
    return out


def encode(policy: Policy, settings: dict, rows: list[dict]) -> tuple[list, list]:
    """Prompt ids (with the experiment's system prompt) and target ids, cut as SFTTrainer cuts them."""
    limit = settings["train"]["max_completion_length"]
    system = settings["train"]["data"]["system_prompt"]
    prompts = policy.encode([r["prompt"] for r in rows], system_prompt=system)
    tok = policy.tokenizer
    targets = []
    for r in rows:
        ids = tok.encode(r["solution"], add_special_tokens=False)
        targets.append(ids[:limit] if len(ids) >= limit else ids + [tok.eos_token_id])
    return prompts, targets


def mean_kl(scores: list[TokenFidelity]) -> float:
    return sum(scores, TokenFidelity()).kl_after_eviction


def topk_change(policy: Policy, prompts: list, targets: list, top_k: int) -> float:
    """Relative change of the base model's mean KL after eviction when the teacher is kept as its
    top-k + the rest (the training loss) rather than the whole vocabulary."""
    exact = teacher_targets(policy, prompts, targets, None)
    cut = teacher_targets(policy, prompts, targets, top_k)
    starts = [first_distilled_token(default_schedule(len(t), policy.cache_config), True) for t in targets]
    sums = torch.zeros(2, dtype=torch.float64)

    def accumulate(lp: torch.Tensor, a: int, b: int, rows: list[int]) -> None:
        positions = torch.arange(a, b)
        for j, i in enumerate(rows):
            mask = (positions >= starts[i]) & (positions < len(targets[i]))
            for k, target in enumerate((exact, cut)):
                sums[k] += token_kl(lp[j : j + 1], target.rows([i], a, b))[0][mask].sum().double()

    with torch.no_grad():
        policy.replay_logprobs(prompts, targets, distribution_fn=accumulate)
    return float((sums[1] - sums[0]) / sums[0])


def run_arm(arm: str, settings: dict, out: Path, log_path: Path) -> dict:
    """Train (or load) one arm, choose its checkpoint on the validation traces, score the test traces."""
    log, ev = Log(log_path), settings["eval"]
    torch.manual_seed(settings["seed"])
    config = arm_config(settings, arm, out / arm, out / "train.jsonl")
    policy = train_arm(config, log, f"{NAME} {arm}")
    val = json.loads((out / "validation.json").read_text())
    test = json.loads((out / "test.json").read_text())
    curve, best = [], (mean_kl(sequence_fidelity({arm: policy}, policy, *val, ev["batch"])[arm]), "final")
    for path in list_checkpoints(out / arm / "checkpoints"):
        ckpt = Policy.from_pretrained(adapter_path=str(path / ADAPTER_DIR), cache=config.cache)
        kl = mean_kl(sequence_fidelity({arm: ckpt}, ckpt, *val, ev["batch"])[arm])
        curve.append((int(path.name.split("-")[1]), kl))
        if kl < best[0]:
            best, policy = (kl, path.name), ckpt
        else:
            del ckpt
    scores = sequence_fidelity({arm: policy}, policy, *test, ev["batch"])[arm]
    extra = {}
    if config.adapter.mode == "none":
        k, top_k = ev["topk_traces"], settings["train"]["distill_top_k"]
        extra["topk_change"] = topk_change(policy, test[0][:k], test[1][:k], top_k)
    total = sum(scores, TokenFidelity())
    log(f"{NAME} {arm}: validation KL curve {' '.join(f'{s}:{v:.4f}' for s, v in curve)}; chosen {best[1]}; "
        f"test KL {total.kl_after_eviction:.4f} top-1 {total.top1_agreement:.3f} ({total.tokens} tokens)")
    return {"curve": curve, "chosen": best[1], "validation_kl": best[0],
            "kl": [s.kl_sum for s in scores], "hits": [s.top1_hits for s in scores],
            "tokens": [s.tokens for s in scores], **extra}


def ratio(values: torch.Tensor, tokens: torch.Tensor):
    return lambda i: (values[i].sum() / tokens[i].sum()).item()


def arm_rows(arm: str, res: dict) -> list[dict]:
    kl, hits, tokens = (torch.tensor(res[k], dtype=torch.float64) for k in ("kl", "hits", "tokens"))
    n = int(tokens.sum())
    rows = [row(arm, "kl_after_eviction", float(kl.sum() / n), n,
                bootstrap_interval(ratio(kl, tokens), len(kl)), traces=len(kl), chosen=res["chosen"]),
            row(arm, "top1_agreement", float(hits.sum() / n), n,
                bootstrap_interval(ratio(hits, tokens), len(kl)), traces=len(kl))]
    if "topk_change" in res:
        rows.append(row(arm, "topk_kl_rel_change", res["topk_change"], n))
    return rows


def difference_rows(a: str, b: str, results: dict) -> list[dict]:
    """`a` - `b` on the same test traces, with paired bootstrap intervals over traces."""
    tokens = torch.tensor(results[a]["tokens"], dtype=torch.float64)
    if not torch.equal(tokens, torch.tensor(results[b]["tokens"], dtype=torch.float64)):
        raise ValueError(f"{a} and {b} compared different tokens: give them the same window")
    out = []
    for metric, key in (("kl_after_eviction", "kl"), ("top1_agreement", "hits")):
        va, vb = (torch.tensor(results[m][key], dtype=torch.float64) for m in (a, b))
        out.append(row(f"{a}-{b}", metric, float((va - vb).sum() / tokens.sum()), int(tokens.sum()),
                       bootstrap_interval(ratio(va - vb, tokens), len(va)), traces=len(va)))
        if key == "kl":
            def relative(i, va=va, vb=vb):
                return (va[i].sum() / vb[i].sum()).item() - 1.0
            out.append(row(f"{a}-{b}", "kl_relative", float(va.sum() / vb.sum()) - 1.0, int(tokens.sum()),
                           bootstrap_interval(relative, len(va)), traces=len(va)))
    return out


def criteria(rows: list[dict], settings: dict) -> dict[str, bool]:
    """The success criteria stated in the config, checked against the rows (empty when a variant's
    run lacks the arms they compare)."""
    c, get = settings["criteria"], {(r["method"], r["metric"]): r for r in rows}
    if not {c["reference"], c["method"], c["baseline"]} <= {r["method"] for r in rows}:
        return {}
    base = get[(c["reference"], "kl_after_eviction")]["value"]
    rel = get[(f"{c['method']}-{c['baseline']}", "kl_relative")]
    top1 = get[(f"{c['method']}-{c['baseline']}", "top1_agreement")]
    return {
        "adapters_below_base": all(get[(m, "kl_after_eviction")]["value"] < base
                                   for m in (c["method"], c["baseline"])),
        "kl_gain": rel["value"] <= -c["min_relative_kl_gain"] and rel["hi"] < 0,
        "top1_not_worse": top1["value"] >= 0 or top1["hi"] > 0,
    }


def run(settings: dict, out: Path, log: Log) -> dict:
    d = settings["data"]
    budget = settings["train"]["max_steps"] * settings["train"]["prompts_per_step"]
    train = solution_rows(settings, "train", 0, budget)
    val = solution_rows(settings, "train", len(train), d["validation"])
    test = solution_rows(settings, "test", 0, d["test"])
    (out / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    policy = Policy.from_pretrained(settings["train"].get("model", "default"))
    for name, rows in (("validation", val), ("test", test)):
        (out / f"{name}.json").write_text(json.dumps(encode(policy, settings, rows)))
    lengths = [len(t) for t in json.loads((out / "test.json").read_text())[1]]
    log(f"{NAME}: {len(train)} training, {len(val)} validation, {len(test)} test solutions of "
        f"{d['dataset']}; window {settings['window']}, test targets {min(lengths)}-{max(lengths)} tokens "
        f"(mean {sum(lengths) / len(lengths):.0f})")
    del policy
    results = run_arms(run_arm, list(settings["arms"]), settings["workers"], settings, out, log.path)
    table = [r for arm, res in results.items() for r in arm_rows(arm, res)]
    for a, b in settings["differences"]:
        table += difference_rows(a, b, results)
    return {"name": NAME, "window": settings["window"], "evict_ratio": settings["evict_ratio"],
            "settings": settings, "rows": table,
            "curves": {arm: res["curve"] for arm, res in results.items() if res["curve"]},
            "criteria": criteria(table, settings)}
