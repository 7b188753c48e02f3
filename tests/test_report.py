"""`thoughtfold report`: markdown table and PNG plots from fixture eval summaries and training logs,
and from a real (stub-model) evaluation's output."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import is_png
from thoughtfold.cli import main
from thoughtfold.config import CacheConfig
from thoughtfold.errors import DataError
from thoughtfold.evaluation.evaluate import EvalConfig, evaluate
from thoughtfold.evaluation.report import build_report, discover
from thoughtfold.policy import GenerationResult, Policy

RUNS = Path(__file__).parent / "fixtures" / "report_runs"


def test_report_on_fixture_runs(tmp_path):
    out = tmp_path / "report"
    text, plots = build_report([RUNS / "base", RUNS / "pte", RUNS / "grpo-pte", RUNS / "grpo-lora"], out)
    assert (out / "report.md").read_text() == text
    names = sorted(p.name for p in plots)
    assert names == ["accuracy_gsm8k.png", "accuracy_math500.png", "loss.png", "reward.png"]
    assert all(is_png(out / n) for n in names)
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
    assert is_png(tmp_path / "rep" / "accuracy_toy.png")
    assert "report.md" in captured.err
    assert main(["report", str(tmp_path / "nothing-here")]) == 2
    assert "error: run directory" in capsys.readouterr().err


def test_report_plots_the_training_diagnostics_of_a_real_run(tmp_path, tiny_dirs):
    from thoughtfold import AdapterConfig, GRPOTrainer, TrainConfig

    config = TrainConfig(model=str(tiny_dirs["llama"]), dtype="float32", device="cpu",
                         cache=CacheConfig(window=6),
                         adapter=AdapterConfig(mode="pte", rank=4, global_tokens=2),
                         num_generations=2, prompts_per_step=1, max_completion_length=12, max_steps=2,
                         save_steps=0, progress=False, output_dir=str(tmp_path / "pte-run"), temperature=1.0)

    def longer(prompts, completions, **columns):
        return [float(len(c)) for c in completions]

    rows = [{"prompt": "abc"}, {"prompt": "xyz"}]
    GRPOTrainer(reward_funcs=longer, args=config, train_dataset=rows).train()
    text, plots = build_report([tmp_path / "pte-run"], tmp_path / "report")
    assert [p.name for p in plots if p.name.startswith("diagnostics")] == ["diagnostics_pte-run.png"]
    assert is_png(tmp_path / "report" / "diagnostics_pte-run.png") and "diagnostics_pte-run.png" in text
