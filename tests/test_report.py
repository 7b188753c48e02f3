"""`thoughtfold report`: markdown table and PNG plots from fixture eval summaries and training logs,
and from a real (stub-model) evaluation's output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from thoughtfold.bench import _comparison_rows, random_model
from thoughtfold.cli import main
from thoughtfold.config import CacheConfig
from thoughtfold.errors import DataError
from thoughtfold.evaluate import EvalConfig, evaluate
from thoughtfold.policy import GenerationResult, Policy
from thoughtfold.replay import BACKPROP
from thoughtfold.report import build_report, discover

RUNS = Path(__file__).parent / "fixtures" / "report_runs"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_report_on_fixture_runs(tmp_path):
    out = tmp_path / "report"
    text, plots = build_report([RUNS / "base", RUNS / "pte", RUNS / "grpo-pte", RUNS / "grpo-lora"], out)
    assert (out / "report.md").read_text() == text
    names = sorted(p.name for p in plots)
    assert names == ["accuracy_gsm8k.png", "accuracy_math500.png", "loss.png", "reward.png"]
    assert all(_is_png(out / n) for n in names)
    # accuracy: a method x window table per dataset, pass@1 (pass@4) in percent
    assert "### gsm8k" in text and "### math500" in text
    assert "| method | W=64        | W=128       | W=full       |" in text
    assert "| pte    | 41.7 (66.7) | 50.0 (66.7) | 58.3 (100.0) |" in text
    assert "| base   | 25.0 (50.0) | 33.3 (66.7) | 50.0 (66.7)  |" in text
    # training: the line cut short at the end of grpo-pte's log is skipped
    pte_row = next(line for line in text.splitlines() if line.startswith("| grpo-pte"))
    cells = [c.strip() for c in pte_row.strip("|").split("|")]
    assert cells[:5] == ["grpo-pte", "pte", "32", "arith:easy", "30"]
    lora_row = next(line for line in text.splitlines() if line.startswith("| grpo-lora"))
    assert "| lora " in lora_row and "| full " in lora_row
    for name in names:
        assert f"]({name})" in text


def test_report_labels_repeated_methods_by_run(tmp_path):
    shutil.copytree(RUNS / "pte", tmp_path / "pte-w32")
    shutil.copytree(RUNS / "pte", tmp_path / "pte-w64")
    text, plots = build_report([tmp_path / "pte-w32", tmp_path / "pte-w64"], tmp_path / "out")
    assert "| pte [pte-w32] |" in text and "| pte [pte-w64] |" in text
    assert "## Training" not in text
    assert len(plots) == 2


def test_report_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        discover([tmp_path / "missing"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no eval summary"):
        discover([tmp_path / "empty"])


def _cells(text: str, first: str) -> list[str]:
    line = next(ln for ln in text.splitlines() if ln.startswith(f"| {first} "))
    return [c.strip() for c in line.strip().strip("|").split("|")]


class StubPolicy:
    """Answers every prompt with a fixed boxed number; enough to produce a real eval directory."""

    def __init__(self, answers):
        self.answers, self.cache_config, self.base_model = answers, CacheConfig(), "stub"

    using_cache = Policy.using_cache  # evaluate() switches windows through it

    def generate(self, prompts, **kwargs):
        w = self.cache_config.window
        texts = [f"\\boxed{{{self.answers.get(p, 0)}}}" for p in prompts]
        n = len(prompts)
        return GenerationResult([[1] * 10] * n, [[0.0] * 10] * n, texts, [[]] * n,
                                [0 if w is None else 2] * n, [10] * n, [False] * n, [[1]] * n)


def test_report_on_real_eval_output_and_cli(tmp_path, capsys):
    problems = [{"prompt": "1+1?", "answer": "2"}, {"prompt": "2+2?", "answer": "4"}]
    for name, answers in (("base", {"1+1?": 2}), ("pte", {"1+1?": 2, "2+2?": 4})):
        config = EvalConfig(datasets=["toy"], windows=[8, None], n_samples=2, reward="arith",
                            output_dir=str(tmp_path / name / "eval"), method=name, progress=False)
        evaluate(StubPolicy(answers), config, datasets={"toy": problems})
    rc = main(["report", str(tmp_path / "base"), str(tmp_path / "pte"), "--output", str(tmp_path / "rep")])
    captured = capsys.readouterr()
    assert rc == 0
    assert _cells(captured.out, "base") == ["base", "50.0 (50.0)", "50.0 (50.0)"]
    assert _cells(captured.out, "pte") == ["pte", "100.0 (100.0)", "100.0 (100.0)"]
    assert _cells(captured.out, "method") == ["method", "W=8", "W=full"]
    assert _is_png(tmp_path / "rep" / "accuracy_toy.png")
    assert "report.md" in captured.err
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "error: run directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- thoughtfold bench


def test_bench_command_smoke(tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "all", "--shape", "tiny", "--lengths", "8,16", "--window", "4", "--batch", "1",
               "--tokens", "16", "--output", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    for title in ("Decode: tokens/s and peak memory", "Replay + backward", "Encoder overhead"):
        assert title in captured.out
    assert "| 16         | bounded W=4" in captured.out
    assert _is_png(out / "decode.png") and _is_png(out / "replay.png") and _is_png(out / "grpo.png")
    md = (out / "bench.md").read_text()
    assert "![decode](decode.png)" in md and "HF generate" in md
    tables = json.loads((out / "bench.json").read_text())["tables"]
    for name in ("replay", "grpo"):  # a PTE row per backprop mode, one LoRA row (it never evicts)
        methods = [row[1] for row in tables[name]["rows"] if row[0] == 16]
        assert methods[:4] == [*(f"PTE, bounded, {b} backprop" for b in BACKPROP), "LoRA, full cache (any backprop)"]
        assert "PTE, bounded, full backprop: peak at 16 / at 8 tokens" in [row[1] for row in tables[name]["rows"]]
    eviction = [row for row in tables["eviction"]["rows"] if row[0] == 16]  # a row per policy, against oldest
    assert [row[1] for row in eviction] == ["oldest", "h2o", "snapkv", "headkv"]
    assert eviction[0][3] == eviction[0][5] == "1.00x" and _is_png(out / "eviction.png")


def test_bench_grpo_with_the_gpu_steps_options(tmp_path, capsys):
    """benchmarks/gpu/run.sh's `train` step on the CPU: same options, small shape and lengths."""
    rc = main(["bench", "grpo", "--shape", "cpu-small", "--lengths", "12,24", "--batch", "8", "--window", "8",
               "--rank", "32", "--global-tokens", "32", "--backprop", "state", "--replay-batch", "4",
               "--output", str(tmp_path)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    report = json.loads((tmp_path / "bench.json").read_text())
    settings = report["settings"]
    assert (settings["rank"], settings["global_tokens"], settings["replay_batch"], settings["batch"]) == (32, 32, 4, 8)
    rows = {(row[0], row[1]): row[2:] for row in report["tables"]["grpo"]["rows"]}
    assert set(rows) == {(n, m) for n in (12, 24) for m in ("PTE, bounded, state backprop", "LoRA, full cache (any backprop)",
                                                            "PTE, bounded, state / LoRA peak")} | {
        ("24 vs 12", "PTE, bounded, state backprop: peak at 24 / at 12 tokens")}
    assert all(float(rows[n, "PTE, bounded, state backprop"][0]) > 0 for n in (12, 24))
    assert "0.55x at 3K tokens" in (tmp_path / "bench.md").read_text()
    # the lengths are forced: no token ends a rollout of the bench's random-init models
    assert Policy(random_model("cpu-small", "cpu", torch.float32), None).eos_token_ids == set()


def test_comparison_rows_report_out_of_memory():
    """A call that ran out of CUDA memory is a row saying so; the ratios it would enter stay blank."""
    results = {(8, "PTE"): (1.0, 2 * 2**20, 8 * 2**20), (8, "LoRA"): None,
               (16, "PTE"): (2.0, 2 * 2**20, 8 * 2**20), (16, "LoRA"): (3.0, 4 * 2**20, 10 * 2**20)}
    rows = _comparison_rows(results, [8, 16], ["PTE"], "LoRA", with_total=True)
    assert rows == [[8, "PTE", "1.00", "2.0", "8.0"], [8, "LoRA", "out of memory", "", ""], [8, "PTE / LoRA peak", "", "", ""],
                    [16, "PTE", "2.00", "2.0", "8.0"], [16, "LoRA", "3.00", "4.0", "10.0"],
                    [16, "PTE / LoRA peak", "", "0.50x", "0.80x"], ["16 vs 8", "PTE: peak at 16 / at 8 tokens", "", "1.00x", "1.00x"]]


def test_bench_checks_compiled_decoding_against_eager(tmp_path, capsys):
    """A compiled (on CUDA: also captured) step is checked against eager decoding in the same run."""
    rc = main(["bench", "decode", "--shape", "tiny", "--lengths", "8", "--window", "4", "--batch", "2",
               "--methods", "bounded-compiled", "--output", str(tmp_path)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "(compiled): tokens vs eager decoding (greedy) | same (2 x 64 tokens)" in out


def test_first_difference():
    from thoughtfold.bench import _first_difference

    assert _first_difference([1, 2, 3], [1, 2, 3]) is None
    assert _first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert _first_difference([1, 2], [1, 2, 3]) == 2


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
