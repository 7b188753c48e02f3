"""Memory of the replay + backward is bounded by the window, not the completion length; a
full-cache forward/backward grows. Measured in fresh subprocesses, as the issue asks."""

from __future__ import annotations

import json
import subprocess
import sys

import torch

from thoughtfold.evaluation.bench.memory import PeakMemory

SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, sys.argv[1])
from conftest import byte_tokenizer
from transformers import AutoModelForCausalLM
from thoughtfold import AdapterConfig, CacheConfig
from thoughtfold.evaluation.bench.memory import PeakMemory
from thoughtfold.policy import Policy

model_dir, length, window = sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
cache = CacheConfig(window=None if window == "none" else int(window))
adapter = AdapterConfig(mode="pte" if cache.bounded else "lora", rank=4, global_tokens=4)
policy = Policy(model, byte_tokenizer(), cache=cache, adapter=adapter)
g = torch.Generator().manual_seed(0)
prompt = torch.randint(0, 250, (12,), generator=g).tolist()
completion = torch.randint(0, 250, (length,), generator=g).tolist()
with PeakMemory("cpu") as m:
    policy.replay_logprobs([prompt] * 2, [completion] * 2, loss_fn=lambda lp, a, b, rows: -lp.sum())
print(json.dumps({"peak": m.peak_bytes}))
"""


def peak(tiny_dirs, length: int, window: str) -> int:
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, tests_dir, str(tiny_dirs["llama"]), str(length), window],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak"]


def test_replay_memory_flat_in_length_full_cache_grows(tiny_dirs):
    w = 32
    bounded_2w, bounded_8w = peak(tiny_dirs, 2 * w, str(w)), peak(tiny_dirs, 8 * w, str(w))
    full_2w, full_8w = peak(tiny_dirs, 2 * w, "none"), peak(tiny_dirs, 8 * w, "none")
    assert bounded_8w <= 1.15 * bounded_2w
    assert full_8w > 2.5 * full_2w
    assert bounded_8w < 0.5 * full_8w


def test_peak_memory_counts_live_tensors_only():
    with PeakMemory("cpu") as m:
        a = torch.zeros(1000, 250)  # 1 MB
        b = torch.ones(1000, 250)
        del b
        c = a + 1
    assert m.peak_bytes == 2_000_000
    del c


def test_peak_memory_does_not_count_views_of_tensors_made_before():
    """A linear layer's forward views its weight (a transpose): the weight was there before the block,
    so only the output counts."""
    layer = torch.nn.Linear(1000, 500, bias=False)  # 2 MB of weight
    x = torch.ones(4, 1000)
    with PeakMemory("cpu") as m:
        y = layer(x)
        x.mul_(2)  # in place on a tensor from outside: nothing new
    assert m.peak_bytes == y.untyped_storage().nbytes() == 4 * 500 * 4
