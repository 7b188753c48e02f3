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
from .errors import STORAGE_ERRNOS, ConfigError, CorruptFileError, StorageError

CONFIG_NAME = "thoughtfold_adapter.json"
WEIGHTS_NAME = "adapter.safetensors"
PEFT_DIR = "peft"
LOCK_NAME = ".lock"
HEAD_WEIGHTS = "eviction.head_weights"  # headkv's per-head weights [layers, kv_heads], when calibrated


def atomic_write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` through a temporary sibling and os.replace: a kill at any moment
    leaves the old content or the new, never a truncated file (a full disk: the old one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise storage_error(e, path) from None


def storage_error(error: OSError, path: Path) -> StorageError:
    """A failed write as a one-line StorageError that names the file and what to do."""
    storage = StorageError(f"cannot write {path}: {error.strerror or error}; free space there or choose "
                           "another output directory")
    storage.errno = error.errno
    return storage


def output_directory(directory: str | os.PathLike, what: str = "output directory") -> Path:
    """`directory`, created if needed and checked writable before any work: a path that is a file,
    on a read-only disk or without permission is a ConfigError that says so."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot write to the {what} {directory}: {e.strerror or e}") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"cannot write to the {what} {directory}: it is read-only for this user")
    return directory


def lock_directory(directory: str | os.PathLike, owner: str) -> IO[str]:
    """Create `directory` and hold an exclusive lock on it for as long as the returned file stays
    open (closed, or its process gone: released). Two runs writing one directory would interleave
    their logs and checkpoints; this also finds a read-only or full directory before a model loads.
    A POSIX record lock (lockf) is per process: runs are processes, and one process may build
    several trainers on one directory (one after the other) without deadlocking itself."""
    directory = output_directory(directory)
    try:
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
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise storage_error(e, target) from None
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
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, StorageError) or e.errno not in STORAGE_ERRNOS:
            raise
        raise storage_error(e, target) from None
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
    head_weights: torch.Tensor | None = None,
) -> Path:
    """Write the adapter (and encoder) tensors plus the settings that rebuild them; `head_weights`
    (headkv's calibration, when made) go with them, so that whatever loads the adapter evicts as the
    run that saved it did."""
    if adapter.mode == "none":
        raise ConfigError("adapter mode is 'none': there is no adapter to save")
    target = Path(directory)
    tensors = adapter_state_dict(wrappers, model)
    if encoder is not None:
        tensors.update({f"encoder.{k}": v.detach() for k, v in encoder.state_dict().items()})
    if head_weights is not None:
        tensors[HEAD_WEIGHTS] = head_weights.detach()
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
    meta = _read_meta(path)
    try:
        # adapters saved before the residual form existed computed the paper's A S B
        adapter = AdapterConfig(**{"residual": False, **meta["adapter"]})
        saved_cache = CacheConfig(**meta["cache"])
        base_model = meta.get("base_model", "default")
        if not isinstance(base_model, str) or not base_model:
            raise TypeError(f"base_model must be a model id or path, got {base_model!r:.60}")
    except (KeyError, TypeError, ConfigError) as e:
        raise CorruptFileError(f"{path} is malformed ({' '.join(str(e).split())}); re-save the adapter") \
            from None
    if cache is None:
        window = cache_fields.pop("window", saved_cache.window)
        cache = replace(saved_cache.with_window(window), **cache_fields)
    return adapter, cache, model if model is not None else base_model


def _read_meta(path: Path) -> dict[str, Any]:
    """An adapter's JSON settings: a UTF-8 JSON object holding "adapter" and "cache" objects."""
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise CorruptFileError(f"{path} is not UTF-8 text (byte at offset {e.start}); re-save the adapter") \
            from None
    except (json.JSONDecodeError, RecursionError) as e:
        reason = f"{e.msg} at line {e.lineno}" if isinstance(e, json.JSONDecodeError) else "nested too deeply"
        raise CorruptFileError(f"{path} is not valid JSON ({reason}); re-save the adapter") from None
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), dict) for k in ("adapter", "cache")):
        raise CorruptFileError(f"{path} must be a JSON object with \"adapter\" and \"cache\" objects; "
                               "re-save the adapter")
    return meta


def load_adapter_weights(
    directory: str | os.PathLike, model: nn.Module, wrappers: list[LowRankLinear],
    encoder: ThoughtEncoder | None,
) -> torch.Tensor | None:
    """Copy saved tensors into the attached wrappers/encoder; every tensor must match and be finite
    (NaN weights would load silently and turn every output into NaN). Returns the saved headkv head
    weights (None when the adapter has none). A damaged file is a CorruptFileError, tensors of
    another shape (another model or rank) a ConfigError."""
    path = Path(directory) / WEIGHTS_NAME
    try:
        tensors = load_file(str(path))
    except FileNotFoundError:
        raise CorruptFileError(f"{path} not found: the adapter directory is incomplete") from None
    except Exception as e:  # safetensors raises its own error types for truncated or garbled files
        raise CorruptFileError(f"{path} is truncated or corrupt ({' '.join(str(e).split())[:200]}); "
                               "re-save or re-download the adapter") from None
    head_weights = _head_weights(tensors.pop(HEAD_WEIGHTS, None), model, path)
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
            raise CorruptFileError(f"adapter tensor {name} in {path} holds NaN or infinite values: "
                                   "the training that saved it diverged; use an earlier checkpoint")
    with torch.no_grad():
        for name, target in expected.items():
            target.copy_(tensors[name].to(target.device, target.dtype))
    return head_weights


def _head_weights(weights: torch.Tensor | None, model: nn.Module, path: Path) -> torch.Tensor | None:
    """Saved headkv head weights, checked: one finite positive weight per layer and KV head."""
    if weights is None:
        return None
    shape = (model.config.num_hidden_layers, model.config.num_key_value_heads)
    if tuple(weights.shape) != shape:
        raise ConfigError(f"{HEAD_WEIGHTS} in {path} has shape {tuple(weights.shape)}, this model needs "
                          f"{shape}: load the adapter onto the base model it was trained on")
    if not weights.is_floating_point() or not (torch.isfinite(weights) & (weights >= 0)).all():
        raise CorruptFileError(f"{HEAD_WEIGHTS} in {path} holds negative, NaN or infinite values; "
                               "re-save the adapter")
    return weights


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
