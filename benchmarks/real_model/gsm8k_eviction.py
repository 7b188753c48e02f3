"""Fidelity per eviction policy on GSM8K (`gsm8k-eviction`): the model's own full-cache greedy traces
on GSM8K problems, replayed under each eviction policy (`cache.eviction` = oldest, h2o, snapkv,
headkv) by the base model and (when the settings' `methods` include it) by PTE trained under that
policy on the training traces with SFTTrainer; KL to the full-cache model and top-1 agreement after
the first eviction, and final-answer agreement of the policy's own greedy decoding.

Every setting is in `gsm8k-eviction.yaml`; `run.py --set key=value` overrides any of them.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import Log, arm_config, row, train_arm

from thoughtfold.config import EVICTIONS, CacheConfig
from thoughtfold.evaluation.fidelity import answer_agreement, full_cache_traces, token_fidelity
from thoughtfold.policy import Policy
from thoughtfold.tasks.data import load_dataset_by_name

NAME = "gsm8k-eviction"


def run(settings: dict, out: Path, log: Log) -> dict:
    d, t = settings["data"], settings["train"]
    system = t["data"]["system_prompt"]
    train = load_dataset_by_name(d["dataset"], split="train", limit=d["train"])
    test = load_dataset_by_name(d["dataset"], split="test", limit=d["test"])
    teacher = Policy.from_pretrained(t.get("model", "default"))
    traces = full_cache_traces(teacher, [e["prompt"] for e in train + test], t["max_completion_length"],
                               d["batch"], system_prompt=system)
    data = out / "train_traces.jsonl"
    data.write_text("".join(json.dumps({"prompt": e["prompt"], "answer": e["answer"], "solution": ids}) + "\n"
                            for e, ids in zip(train, traces.completion_ids[: len(train)], strict=True)))
    policies = {}
    for eviction in EVICTIONS:
        cache = CacheConfig(window=settings["window"], evict_ratio=settings["evict_ratio"], eviction=eviction)
        if "base" in settings["methods"]:
            policies[f"base@{eviction}"] = Policy.from_pretrained(t.get("model", "default"), cache=cache)
        if "pte" in settings["methods"]:
            arm = {**settings, "arms": {"pte": {"adapter": {"mode": "pte"}, "cache": {"eviction": eviction}}}}
            config = arm_config(arm, "pte", out / f"pte-{eviction}", data)
            policies[f"pte@{eviction}"] = train_arm(config, log, f"{NAME} pte@{eviction}")
    n_train = len(train)
    prompts, test_traces = traces.prompt_ids[n_train:], traces.completion_ids[n_train:]
    fidelity = token_fidelity(policies, teacher, prompts, test_traces)
    rows = []
    for method, policy in policies.items():
        f = fidelity[method]
        agreement, compared = answer_agreement(policy, [e["prompt"] for e in test], traces.texts[n_train:],
                                               t["max_completion_length"], d["batch"], system_prompt=system)
        rows += [row(method, "kl_after_eviction", f.kl_after_eviction, f.tokens),
                 row(method, "top1_agreement", f.top1_agreement, f.tokens),
                 row(method, "answer_agreement", agreement, compared)]
        log(f"{NAME} {method:12s} KL {f.kl_after_eviction:.4f} top1 {f.top1_agreement:.3f} "
            f"({f.tokens} tokens) answers {agreement:.3f} ({compared})")
    return {"name": NAME, "window": settings["window"], "evict_ratio": settings["evict_ratio"],
            "max_new_tokens": t["max_completion_length"], "train_problems": len(train),
            "test_problems": len(test), "settings": settings, "rows": rows}
