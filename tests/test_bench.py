"""`thoughtfold bench`: every benchmark on toy shapes (tables, JSON, plots), the options of the GPU
run's steps, the compiled-vs-eager check, and the rows of an out-of-memory call."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import is_png
from thoughtfold.cli import main
from thoughtfold.config import BACKPROP
from thoughtfold.errors import ConfigError
from thoughtfold.evaluation.bench.config import DECODE_METHODS, BenchConfig
from thoughtfold.evaluation.bench.decode import first_difference
from thoughtfold.evaluation.bench.measure import random_model
from thoughtfold.evaluation.bench.table import Table
from thoughtfold.evaluation.bench.training import LORA, add_comparison_rows
from thoughtfold.policy import Policy


def test_bench_command_smoke(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "all", "--shape", "tiny", "--lengths", "8,16", "--window", "4", "--batch", "1",
               "--tokens", "16", "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for title in ("Decode: tokens/s and peak memory", "Replay + backward", "Encoder overhead"):
        assert title in captured.out
    assert "| 16         | bounded W=4" in captured.out
    assert is_png(out / "decode.png") and is_png(out / "replay.png") and is_png(out / "grpo.png")
    md = (out / "bench.md").read_text()
    assert "![decode](decode.png)" in md and "HF generate" in md
    tables = json.loads((out / "bench.json").read_text())["tables"]
    for name in ("replay", "grpo"):  # a PTE row per backprop mode, one LoRA row (it never evicts)
        rows = [row["cells"] for row in tables[name]["rows"]]
        methods = [cells[1] for cells in rows if cells[0] == 16]
        assert methods[:4] == [*(f"PTE, bounded, {b} backprop" for b in BACKPROP),
                               "LoRA, full cache (any backprop)"]
        assert "PTE, bounded, full backprop: peak at 16 / at 8 tokens" in [cells[1] for cells in rows]
        measured = [row["cells"] for row in tables[name]["rows"] if row["kind"] == "measured"]
        # numbers, not text
        assert all(isinstance(c, float) and c > 0 for cells in measured for c in cells[2:])
    eviction = [row["cells"] for row in tables["eviction"]["rows"] if row["cells"][0] == 16]  # one per policy
    assert [cells[1] for cells in eviction] == ["oldest", "h2o", "snapkv", "headkv"]
    assert eviction[0][3] == eviction[0][5] == 1.0 and is_png(out / "eviction.png")
    assert "| oldest   |" in captured.out and "| 1.00x" in captured.out


def test_bench_grpo_with_the_gpu_steps_options(tmp_path, capsys):
    """benchmarks/gpu/run.sh's `train` step on the CPU: same options, toy shape and lengths."""
    rc = main(["bench", "grpo", "--shape", "tiny", "--lengths", "12,24", "--batch", "8", "--window", "8",
               "--rank", "32", "--global-tokens", "32", "--backprop", "state", "--replay-batch", "4",
               "--output", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((tmp_path / "bench.json").read_text())
    settings = report["settings"]
    assert [settings[k] for k in ("rank", "global_tokens", "replay_batch", "batch")] == [32, 32, 4, 8]
    rows = {(row["cells"][0], row["cells"][1]): row["cells"][2:] for row in report["tables"]["grpo"]["rows"]}
    methods = ("PTE, bounded, state backprop", "LoRA, full cache (any backprop)",
               "PTE, bounded, state / LoRA peak")
    assert set(rows) == {(n, m) for n in (12, 24) for m in methods} | {
        ("24 vs 12", "PTE, bounded, state backprop: peak at 24 / at 12 tokens")}
    assert all(rows[n, "PTE, bounded, state backprop"][0] > 0 for n in (12, 24))
    assert "0.55x at 3K tokens" in (tmp_path / "bench.md").read_text()
    # the lengths are forced: no token ends a rollout of the bench's random-init models
    assert Policy(random_model("cpu-small", "cpu", torch.float32), None).eos_token_ids == set()


def test_comparison_rows_report_out_of_memory():
    """A call that ran out of CUDA memory is a row saying so; the ratios it would enter stay blank."""
    results = {(8, "PTE"): (1.0, 2 * 2**20, 8 * 2**20), (8, LORA): None,
               (16, "PTE"): (2.0, 2 * 2**20, 8 * 2**20), (16, LORA): (3.0, 4 * 2**20, 10 * 2**20)}
    table = Table("t", ["n", "method", "seconds", "peak", "total"],
                  [None, None, "{:.2f}", "{:.1f}", "{:.1f}"])
    add_comparison_rows(table, results, ["PTE"], with_total=True)
    assert [(r.cells, r.kind) for r in table.rows] == [
        ([8, "PTE", 1.0, 2.0, 8.0], "measured"), ([8, LORA, "out of memory", None, None], "measured"),
        ([8, "PTE / LoRA peak", None, None, None], "ratio"),
        ([16, "PTE", 2.0, 2.0, 8.0], "measured"), ([16, LORA, 3.0, 4.0, 10.0], "measured"),
        ([16, "PTE / LoRA peak", None, 0.5, 0.8], "ratio"),
        (["16 vs 8", "PTE: peak at 16 / at 8 tokens", None, 1.0, 1.0], "ratio")]
    printed = {tuple(c.strip() for c in line.strip("|").split("|")) for line in table.markdown().splitlines()}
    assert ("8", LORA, "out of memory", "", "") in printed
    assert ("16", "PTE / LoRA peak", "", "0.50x", "0.80x") in printed
    assert table.series(2) == {"PTE": [(8.0, 1.0), (16.0, 2.0)], LORA: [(16.0, 3.0)]}  # what is plotted


def test_bench_checks_compiled_decoding_against_eager(tmp_path, capsys):
    """A compiled (on CUDA: also captured) step is checked against eager decoding in the same run."""
    rc = main(["bench", "decode", "--shape", "tiny", "--lengths", "8", "--window", "4", "--batch", "2",
               "--methods", "bounded-compiled", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "(compiled): tokens vs eager decoding (greedy) | same (2 x 64 tokens)" in out


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_bench_command_errors(capsys):
    assert main(["bench", "decode", "--shape", "huge"]) == 2
    assert "unknown shape 'huge'" in capsys.readouterr().err
    assert main(["bench", "decode", "--lengths", "8,x"]) == 2
    assert "lengths must be comma-separated integers" in capsys.readouterr().err
    assert main(["bench", "fold"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert main(["bench", "grpo", "--backprop", "state,exact"]) == 2
    assert "unknown backprop mode(s) exact; choose from state, truncated, full" in capsys.readouterr().err
    assert main(["bench", "grpo", "--replay-batch", "0"]) == 2
    assert main(["bench", "eviction", "--evictions", "oldest,lru"]) == 2
    assert "replay_batch must be >= 1" in capsys.readouterr().err


def test_bench_config_is_validated_once():
    with pytest.raises(ConfigError, match="unknown decode method.s. warp"):
        BenchConfig(decode_methods=("bounded", "warp"))
    with pytest.raises(ConfigError, match="lengths must be integers >= 1"):
        BenchConfig(lengths=[8, 0])
    with pytest.raises(ConfigError, match="unknown dtype 'int8'"):
        BenchConfig(dtype="int8")
    config = BenchConfig(which="grpo", device="cuda:1", replay_batch=2)
    assert (config.dtype_name, config.methods, config.benchmarks) == ("bfloat16", DECODE_METHODS, ("grpo",))
    assert config.settings()["replay_batch"] == 2 and config.lengths_for("grpo") == [512, 1024, 2048]
