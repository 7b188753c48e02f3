"""The per-row estimate that sizes replay micro-batches against the measured peak of real replays with
backward (tiny Llama and Qwen3 layers, every backprop mode, bounded and full caches)."""

from __future__ import annotations

import pytest
import torch

from conftest import byte_tokenizer, make_tiny_model_dir
from thoughtfold import AdapterConfig, CacheConfig
from thoughtfold.engine.replay_memory import replay_row_bytes, rows_within
from thoughtfold.evaluation.bench.memory import PeakMemory
from thoughtfold.policy import Policy

PROMPT, LENGTH = 20, 48


@pytest.fixture(scope="module")
def wide_dirs(tmp_path_factory):
    """Tiny models wide enough that per-token activations dominate the fixed costs of a replay."""
    root = tmp_path_factory.mktemp("wide")
    return {f: make_tiny_model_dir(f, root / f, hidden_size=128, intermediate_size=384)
            for f in ("llama", "qwen3")}


def measured_row_bytes(policy: Policy, backprop: str) -> float:
    """Peak bytes a replay with backward adds per row: the slope between 2 and 6 rows."""
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 250, (PROMPT,), generator=g).tolist()
    completion = torch.randint(0, 250, (LENGTH,), generator=g).tolist()
    peaks = []
    for rows in (2, 6):
        with PeakMemory("cpu") as m:
            policy.replay_logprobs([prompt] * rows, [completion] * rows, backprop=backprop,
                                   loss_fn=lambda lp, a, b, r: -lp.sum())
        peaks.append(m.peak_bytes)
    return (peaks[1] - peaks[0]) / 4


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize(("window", "backprop"), [(16, "state"), (16, "truncated"), (16, "full"),
                                                  (None, "state")])
def test_row_estimate_matches_the_measured_replay_peak(wide_dirs, family, window, backprop):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(wide_dirs[family], dtype=torch.float32)
    cache = CacheConfig(window=window)
    adapter = AdapterConfig(mode="pte" if cache.bounded else "lora", rank=4, global_tokens=4)
    policy = Policy(model, byte_tokenizer(), cache=cache, adapter=adapter)
    estimate = replay_row_bytes(model.config, torch.float32, PROMPT, LENGTH, cache, backprop)
    assert 0.8 <= measured_row_bytes(policy, backprop) / estimate <= 1.25


def test_row_estimate_grows_with_what_a_row_holds_at_once(tiny_dirs):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_dirs["llama"])
    bounded, full = CacheConfig(window=16), CacheConfig(window=None)

    def row(length: int, cache: CacheConfig = bounded, backprop: str = "truncated", **kw) -> int:
        return replay_row_bytes(config, torch.float32, 20, length, cache, backprop, **kw)

    assert row(64) == row(256)  # bounded: segment 0 is the largest graph whatever the length
    assert row(256, backprop="state") > row(64, backprop="state")  # + the evicted K/V
    assert row(256, full) > 3 * row(64, full)
    assert row(64, backprop="full") > row(64)
    assert row(64, loss_input="distribution") > row(64)
    assert replay_row_bytes(config, torch.bfloat16, 20, 64, bounded) < row(64, backprop="state")
    assert rows_within(10 * row(64), row(64)) == 10 and rows_within(1, row(64)) == 1
