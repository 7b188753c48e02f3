"""Checkpoints: written atomically (a kill leaves only a hidden temporary directory, which is
ignored and then removed) and pruned to the newest `keep`."""

from __future__ import annotations

from thoughtfold.config import AdapterConfig
from thoughtfold.policy import Policy
from thoughtfold.training.checkpoint import list_checkpoints, save_checkpoint


def test_checkpoints_are_atomic_and_pruned(tmp_path, tiny_dirs):
    policy = Policy.from_pretrained(str(tiny_dirs["llama"]), adapter=AdapterConfig(mode="lora", rank=4),
                                    device="cpu")
    root = tmp_path / "ckpts"
    (root / ".step-00000009.half-written").mkdir(parents=True)  # what a kill during a save leaves
    assert list_checkpoints(root) == []
    for step in (1, 2, 3):
        save_checkpoint(root, step, policy, {"step": step}, keep=2)
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002", "step-00000003"]
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002", "step-00000003"]
