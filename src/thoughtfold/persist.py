"""Saving and restoring adapters: safetensors for the tensors, JSON for the settings, written to a
temporary directory and renamed into place so a crash never leaves a half-written adapter.
A `lora`-mode adapter is also exported in PEFT's format (`peft/`), loadable with
`PeftModel.from_pretrained(base_model, dir + "/peft")`."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig, CacheConfig
from .engine.adapter import LowRankLinear, adapter_state_dict
from .engine.encoder import ThoughtEncoder
from .errors import ConfigError

CONFIG_NAME = "thoughtfold_adapter.json"
WEIGHTS_NAME = "adapter.safetensors"
PEFT_DIR = "peft"
LOCK_NAME = ".lock"


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` through a temporary sibling and os.replace: a kill at any moment
    leaves the old content or the new, never a truncated file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def lock_directory(directory: str | os.PathLike, owner: str) -> IO[str]:
    """Create `directory` and hold an exclusive lock on it for as long as the returned file stays
    open (closed, or its process gone: released). Two runs writing one directory would interleave
    their logs and checkpoints; this also finds a read-only or full directory before a model loads.
    A POSIX record lock (lockf) is per process: runs are processes, and one process may build
    several trainers on one directory (one after the other) without deadlocking itself."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = (directory / LOCK_NAME).open("a+", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write to the output directory {directory}: {e.strerror or e}") from None
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):
            handle.close()
            raise ConfigError(f"cannot lock the output directory {directory}: {e.strerror or e}") from None
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError(f"{directory} is in use by another {owner} ({holder}); wait for it to end or "
                          "pick another output directory") from None
    try:
        handle.truncate(0)
        handle.write(f"{owner} pid {os.getpid()}\n")
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as e:
        handle.close()
        raise ConfigError(f"cannot write to the output directory {directory}: {e.strerror or e}") from None
    return handle


def weights_digest(directory: str | os.PathLike) -> str | None:
    """SHA-256 of an adapter's weights file (None if it has none): what identifies an adapter,
    since a path can be re-saved with other weights."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Write a directory atomically: fill the yielded hidden temporary sibling of `target`; on
    success it is renamed into place (an existing `target` is moved aside first, since os.replace
    cannot replace a non-empty directory), on failure removed. At every instant one complete copy
    exists, under `target` or a hidden `.{name}.*` name."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_adapter(
    directory: str | os.PathLike,
    model: nn.Module,
    wrappers: list[LowRankLinear],
    encoder: ThoughtEncoder | None,
    adapter: AdapterConfig,
    cache: CacheConfig,
    base_model: str,
) -> Path:
    """Write the adapter (and encoder) tensors plus the settings that rebuild them."""
    if adapter.mode == "none":
        raise ConfigError("adapter mode is 'none': there is no adapter to save")
    target = Path(directory)
    tensors = adapter_state_dict(wrappers, model)
    if encoder is not None:
        tensors.update({f"encoder.{k}": v.detach() for k, v in encoder.state_dict().items()})
    meta = {"adapter": adapter.to_dict(), "cache": cache.to_dict(), "base_model": base_model}
    with atomic_dir(target) as tmp:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp / WEIGHTS_NAME)
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2))
        if adapter.mode == "lora":
            _export_peft(tmp / PEFT_DIR, model, wrappers, adapter, base_model)
    return target


def adapter_settings(directory: str | os.PathLike, model: str | None = None, cache: CacheConfig | None = None,
                     **cache_fields: Any) -> tuple[AdapterConfig, CacheConfig, str]:
    """What a saved adapter runs with: (adapter, cache, base model id). The cache settings and the
    base model are the saved ones unless given here: `cache` replaces the saved cache, single fields
    (`window=`, `evict_ratio=`, as a command line sets them) replace only themselves, `model` the
    base model. The one place that decides "the adapter's saved setting unless given"."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise ConfigError(f"{directory} is not a thoughtfold adapter directory ({CONFIG_NAME} not found)")
    try:
        meta = json.loads(path.read_text())
        # adapters saved before the residual form existed computed the paper's A S B
        adapter = AdapterConfig(**{"residual": False, **meta["adapter"]})
        saved_cache = CacheConfig(**meta["cache"])
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is malformed ({e}); re-save the adapter") from e
    cache = cache if cache is not None else replace(saved_cache, **cache_fields)
    return adapter, cache, model if model is not None else meta.get("base_model", "default")


def load_adapter_weights(
    directory: str | os.PathLike, model: nn.Module, wrappers: list[LowRankLinear],
    encoder: ThoughtEncoder | None,
) -> None:
    """Copy saved tensors into the attached wrappers/encoder; every tensor must match and be finite
    (NaN weights would load silently and turn every output into NaN)."""
    path = Path(directory) / WEIGHTS_NAME
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path} not found: the adapter directory is incomplete") from None
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise ConfigError(f"{path} is truncated or corrupt ({' '.join(str(e).split())[:200]}); "
                          "re-save or re-download the adapter") from None
    expected = adapter_state_dict(wrappers, model)
    if encoder is not None:
        expected.update({f"encoder.{k}": v for k, v in encoder.state_dict().items()})
    missing, extra = expected.keys() - tensors.keys(), tensors.keys() - expected.keys()
    if missing or extra:
        raise ConfigError(
            f"adapter in {directory} does not fit this model (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(extra)[:3]}); load it onto the base model it was trained on"
        )
    for name, target in expected.items():  # all checked before any is copied
        if tensors[name].shape != target.shape:
            raise ConfigError(f"adapter tensor {name} has shape {tuple(tensors[name].shape)}, "
                              f"expected {tuple(target.shape)}: wrong base model or rank")
        if not torch.isfinite(tensors[name]).all():
            raise ConfigError(f"adapter tensor {name} in {path} holds NaN or infinite values: "
                              "the training that saved it diverged; use an earlier checkpoint")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name].to(target.device, target.dtype))


def _export_peft(out: Path, model: nn.Module, wrappers: list[LowRankLinear], adapter: AdapterConfig,
                 base_model: str) -> None:
    """PEFT LoRA layout: our down-projection is PEFT's lora_A, our up-projection its lora_B."""
    from peft import LoraConfig

    out.mkdir(parents=True)
    names = {id(m): n for n, m in model.named_modules()}
    tensors = {}
    for w in wrappers:
        tensors[f"base_model.model.{names[id(w)]}.lora_A.weight"] = w.lora_down.detach().contiguous().cpu()
        tensors[f"base_model.model.{names[id(w)]}.lora_B.weight"] = w.lora_up.detach().contiguous().cpu()
    save_file(tensors, out / "adapter_model.safetensors")
    LoraConfig(
        r=adapter.rank, lora_alpha=adapter.alpha, target_modules=list(adapter.target_modules),
        lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", base_model_name_or_path=base_model,
    ).save_pretrained(str(out))
