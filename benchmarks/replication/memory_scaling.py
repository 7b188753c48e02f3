"""Peak tensor memory of one rollout and one replay+backward as the recall distance D grows, at a
fixed window, for each replay backprop mode: "state" (the default: gradients through the encoder
states), "truncated" and "full" (one graph), against LoRA under the full cache. Weights do not
matter for memory, so the models are random-init with the replication's shape.

    python benchmarks/replication/memory_scaling.py   # writes memory_scaling.json next to it
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from thoughtfold.config import AdapterConfig, CacheConfig
from thoughtfold.evaluation.bench.memory import PeakMemory
from thoughtfold.policy import Policy
from thoughtfold.tasks.recall import RecallTask

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from run import DEFAULT_CONFIG, build_model  # noqa: E402


def measure(steps_list=(31, 63, 127), window: int = 16, probe: int = 8) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for steps in steps_list:
        task = RecallTask(steps)
        prompts, traces = task.sample_traces(probe, seed=0)
        total = sum(map(len, traces))
        for name, window_, mode, backprop in (("lora_full_cache", None, "lora", "state"),
                                              ("pte_truncated", window, "pte", "truncated"),
                                              ("pte_full_backprop", window, "pte", "full"),
                                              ("pte_state_bptt", window, "pte", "state")):
            model = build_model(task, DEFAULT_CONFIG["model"], seed=0)
            policy = Policy(model, None, cache=CacheConfig(window=window_),
                            adapter=AdapterConfig(mode=mode, **DEFAULT_CONFIG["adapter"]))
            with PeakMemory("cpu") as roll:
                policy.generate(prompts, max_new_tokens=task.completion_length, temperature=1.0, seed=0)
            with PeakMemory("cpu") as train:
                policy.replay_logprobs(prompts, traces, loss_fn=lambda lp, a, b, rows, n=total: -lp.sum() / n,
                                       backprop=backprop)
            rows.append({"D": task.distance, "method": name, "window": window_, "sequences": probe,
                         "rollout_peak_bytes": roll.peak_bytes, "train_peak_bytes": train.peak_bytes})
            print(rows[-1], flush=True)
    return rows


def main() -> int:
    rows = measure()
    (HERE / "memory_scaling.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
