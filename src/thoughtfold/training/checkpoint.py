"""Training checkpoints that survive a SIGKILL at any moment.

A checkpoint is a directory ``step-00000012/`` holding the adapter (``adapter/``, as
:meth:`Policy.save_adapter` writes it) and ``trainer_state.pt`` (optimizer, scheduler, RNG states,
data position, step). It is written into a hidden temporary sibling and renamed into place, so a
directory named ``step-*`` is always complete; a killed run leaves at most a hidden temp directory,
which :func:`list_checkpoints` ignores and the next save removes.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import CorruptFileError
from ..persist import atomic_dir, load_adapter_weights

ADAPTER_DIR = "adapter"  # the adapter inside a checkpoint, and the final one in the output directory
STATE_NAME = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STATE_KEYS = {"step", "data_pos", "optimizer", "scheduler", "rng"}


def checkpoint_name(step: int) -> str:
    """Zero-padded so that directory listings sort by step."""
    return f"step-{step:08d}"


def rng_state() -> dict[str, Any]:
    """Every RNG the training loop draws from (rollout seeds are derived from the step, not drawn)."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: str | os.PathLike, step: int, policy, state: dict[str, Any],
                    keep: int | None = None) -> Path:
    """Write checkpoint `step` under `root` atomically; keep only the newest `keep` (None: all)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(root)
    target = root / checkpoint_name(step)
    with atomic_dir(target) as tmp:
        policy.save_adapter(tmp / ADAPTER_DIR)
        torch.save(state, tmp / STATE_NAME)
    if keep is not None:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def _remove_stale_temps(root: Path) -> None:
    """Hidden leftovers of a save that was killed midway."""
    for path in root.glob(".step-*"):
        shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | os.PathLike, policy) -> dict[str, Any]:
    """Copy the checkpoint's adapter (and headkv head weights) into `policy` and return the trainer
    state saved with it. The state is read and checked first, so a damaged checkpoint raises
    CorruptFileError before changing `policy`; an adapter of other shapes is a ConfigError."""
    path = Path(path)
    if not (path / STATE_NAME).is_file():
        raise CorruptFileError(f"{path} is not a complete checkpoint ({STATE_NAME} not found)")
    try:
        state = torch.load(path / STATE_NAME, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, garbled pickle, ...: torch raises many types
        raise CorruptFileError(f"{path / STATE_NAME} is truncated or corrupt ({type(e).__name__})") from None
    if not isinstance(state, dict) or not state.keys() >= _STATE_KEYS or not all(
            isinstance(state[k], int) and state[k] >= 0 for k in ("step", "data_pos")):
        raise CorruptFileError(f"{path / STATE_NAME} does not hold a trainer state (step, data position, "
                               "optimizer, schedule, RNG)")
    policy.head_weights = load_adapter_weights(path / ADAPTER_DIR, policy.model, policy.wrappers,
                                               policy.encoder)
    return state


def check_optimizer_state(saved: Any, optimizer: torch.optim.Optimizer, path: Path) -> None:
    """A CorruptFileError unless `saved` is a state of `optimizer`: the same parameter groups and, for
    every parameter, moments of its shape (the adapter beside it fitted, so a mismatch here means
    the state file belongs to another run)."""
    try:
        groups, moments = saved["param_groups"], saved["state"]
        fits = [len(g["params"]) for g in groups] == [len(g["params"]) for g in optimizer.param_groups]
        if fits:
            ids = [i for g in groups for i in g["params"]]
            params = [p for g in optimizer.param_groups for p in g["params"]]
            fits = all(not torch.is_tensor(v) or v.dim() == 0 or v.shape == p.shape
                       for i, p in zip(ids, params, strict=True) for v in moments.get(i, {}).values())
    except (KeyError, TypeError, ValueError, AttributeError):
        fits = False
    if not fits:
        raise CorruptFileError(f"{path / STATE_NAME}: the optimizer state does not match the adapter saved "
                               "beside it (another run's file?)")


def set_aside(path: Path) -> Path:
    """Rename a damaged checkpoint to `<name>.corrupt` (`.corrupt-2`, ... when taken), where pruning
    and later resumes leave it alone and a person can still look at it."""
    for n in itertools.count(1):
        target = path.with_name(f"{path.name}.corrupt" + ("" if n == 1 else f"-{n}"))
        if not target.exists():
            path.rename(target)
            return target
    raise AssertionError("unreachable")
