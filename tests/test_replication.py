"""benchmarks/replication/run.py: a toy-scale run of the whole replication pipeline (it trains through
the shipped trainers) and the tables it renders into RESULTS.md and the README."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

from thoughtfold.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _load_run():
    """benchmarks/replication/run.py as the module `run`, importable by name, as its worker processes
    (spawned with this process's sys.path) need to unpickle their job function."""
    folder = str(ROOT / "benchmarks/replication")
    if folder not in sys.path:
        sys.path.insert(0, folder)
    return importlib.import_module("run")


def test_pipeline_smoke(tmp_path, capsys):
    run = _load_run()
    config = run.merge(run.DEFAULT_CONFIG, run.QUICK_CONFIG)
    # one method and one ablation (lora_c runs the same job code with another adapter mode)
    config.update(windows=[3], methods=["pte"], ablations=["pte_fb_global0"],
                  sft={**config["sft"], "max_steps": 1})
    results_path = tmp_path / "results.json"
    run.run(config, tmp_path / "out", results_path, tmp_path / "RESULTS.md")
    results = json.loads(results_path.read_text())
    assert results["task"]["D"] == 12 and results["task"]["chance"] == pytest.approx(0.1)
    methods = [(r["method"], r["window"]) for r in results["rows"]]
    assert methods == [("full", None), ("bounded", 3), ("pte", 3), ("pte_fb_global0", 3)]
    for r in results["rows"]:
        assert 0.0 <= r["accuracy"] <= 1.0 and r["n"] == config["eval"]["n"]
        assert r["ci95"][0] <= r["accuracy"] <= r["ci95"][1]
        assert r["rollout_peak_bytes"] > 0
    assert all(r["train_peak_bytes"] > 0 for r in results["rows"] if r["method"] != "bounded")
    assert "| pte | 3 |" in (tmp_path / "RESULTS.md").read_text()
    pte = next(r for r in results["rows"] if r["method"] == "pte")
    assert pte["backprop"] == "state" and pte["sft_steps"] == 3 * config["sft"]["max_steps"]
    # every job ran through the trainers, which left their metrics, checkpoints and adapters
    job = tmp_path / "out" / "jobs" / "pte-W3"
    assert [r["step"] for r in run.read_metrics(job / "sft" / "metrics.jsonl")] == [1, 2, 3]
    assert (job / "grpo" / "adapter" / "adapter.safetensors").is_file()
    # the base model is an ordinary model directory: the CLI generates from it
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "out" / "base"), "--prompt", "^ 3 4",
                 "--no-chat-template", "--max-new-tokens", "4", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["completion_ids"]) == 4


def test_merge_rows_keeps_prose(tmp_path):
    run = _load_run()
    task = {"name": "delayed_recall", "D": 12, "chance": 0.1}
    row = {"method": "pte", "window": 3, "accuracy": 0.5, "n": 10, "ci95": [0.2, 0.8], "chain_accuracy": 1.0,
           "value_entropy_bits": 3.3, "rollout_peak_bytes": 1, "train_peak_bytes": 2}
    main = {"task": task, "model": {"parameters": 1000}, "config": {"memory_probe": 2}, "rows": [row]}
    other = {**main, "rows": [row, {**row, "method": "pte_state_bptt", "accuracy": 0.9}]}
    (tmp_path / "results.json").write_text(json.dumps(main))
    (tmp_path / "other.json").write_text(json.dumps(other))
    (tmp_path / "RESULTS.md").write_text(f"intro\n{run.BEGIN}\nold\n{run.END}\nnotes\n")
    run.main(["--results", str(tmp_path / "results.json"), "--merge", str(tmp_path / "other.json")])
    merged = json.loads((tmp_path / "results.json").read_text())
    assert [r["method"] for r in merged["rows"]] == ["pte", "pte_state_bptt"]
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.startswith("intro\n") and text.endswith("notes\n") and "old" not in text
    assert "| pte_state_bptt | 3 | 0.900 |" in text


def test_readme_table_is_rendered_from_results(tmp_path):
    run = _load_run()
    row = {"method": "pte", "window": 3, "accuracy": 0.5, "n": 10, "train_peak_bytes": 2**21}
    results = {"task": {"D": 12}, "rows": [{**row, "method": "full", "window": None, "accuracy": 0.9}, row,
                                          {**row, "method": "lora_c", "window": 6, "accuracy": 0.1}]}
    (tmp_path / "results.json").write_text(json.dumps(results))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{run.README_BEGIN}\nold\n{run.README_END}\nafter\n")
    run.main(["--results", str(tmp_path / "results.json"), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "old" not in text
    assert "| method | W = 3 (D/4) | W = 6 (D/2) | train peak (W = 3) |" in text
    assert "| full cache (reference) | 0.900 | 0.900 | 2.0 MiB |" in text
    assert "| LoRA_c |  | 0.100 | - |" in text
