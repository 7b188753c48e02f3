"""TRL's configuration names, and what each becomes here. Most `GRPOConfig` / `SFTConfig` fields are
TrainConfig's own; of the rest, each maps to one of ours, translates (batch sizes: TRL counts
completions per device and micro-batch, thoughtfold prompts per optimizer step), changes nothing here
(accepted), or is refused with one line that says what to use. `TrainConfig(...)`, YAML files,
KEY=VALUE overrides and `--name value` flags all pass through :func:`translate`, so a TRL setting
means the same thing everywhere. Plain data and functions: no torch, no transformers."""

from __future__ import annotations

import functools
import importlib.util
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import fields, replace
from typing import Any

from .errors import ConfigError

log = logging.getLogger("thoughtfold")

REPORT_BACKENDS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # backend -> the package it needs
TRL_BATCH_DEFAULTS = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}

# TRL name -> (our setting, value conversion): the same setting under another name
RENAMED: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "shuffle_dataset": ("data.shuffle", bool),
    "disable_tqdm": ("progress", lambda v: not v),
    "use_cpu": ("device", lambda v: "cpu" if v else _KEEP),
    "eval_strategy": ("eval_steps", lambda v: None if v == "no" else _refuse_epoch("eval_strategy", v)),
    "save_strategy": ("save_steps", lambda v: 0 if v == "no" else _refuse_epoch("save_strategy", v)),
}
SFT_LOSS_TYPES = ("nll", "dft")  # SFTConfig's loss_type values (GRPO's are TrainConfig's own loss_type)
SFT_RENAMED: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "max_length": ("max_completion_length", int),
    "loss_type": ("sft_loss", lambda v: v if v == "nll" else _refused(
        "loss_type", v, "SFT's losses here are sft_loss=nll (cross-entropy) or sft_loss=kl (distillation)")),
}

# TRL name -> (is this value harmless here?, what to do instead): refused unless harmless
NO_EFFECT: dict[str, tuple[Callable[[Any], bool], str]] = {
    "push_to_hub": (lambda v: not v, "upload output_dir/adapter with huggingface_hub's upload_folder"),
    "use_vllm": (lambda v: not v, "rollouts run in thoughtfold's bounded-cache decoder; drop use_vllm"),
    "steps_per_generation": (lambda v: v is None, "each step generates once (num_iterations reuses it)"),
    "num_generations_eval": (lambda v: v is None, "evaluation samples num_generations per prompt"),
    "max_prompt_length": (lambda v: v is None, "prompts are pinned whole in the cache; shorten long prompts "
                          "in the data"),
    "min_p": (lambda v: v in (None, 0, 0.0), "use top_p or top_k"),
    "repetition_penalty": (lambda v: v == 1.0, "sampling has no repetition penalty here"),
    "generation_kwargs": (lambda v: not v, "use temperature, top_p and top_k"),
    "cache_implementation": (lambda v: v is None, "the cache is thoughtfold's: set cache.window"),
    "importance_sampling_level": (lambda v: v == "token", "token-level ratios are the only kind here"),
    "multi_objective_aggregation": (lambda v: v == "sum_then_normalize", "rewards are summed, then "
                                    "normalised per group"),
    "delta": (lambda v: v is None, "use epsilon / epsilon_high"),
    "sync_ref_model": (lambda v: not v, "the KL reference is the adapter-disabled model"),
    "top_entropy_quantile": (lambda v: v == 1.0, "every completion token is in the loss"),
    "entropy_coef": (lambda v: v in (0, 0.0), "there is no entropy bonus"),
    "use_adaptive_entropy": (lambda v: not v, "there is no entropy bonus"),
    "trust_remote_code": (lambda v: not v, "the supported families (Llama, Qwen2, Qwen3) need none"),
    "packing": (lambda v: not v, "each trace is replayed on its own"),
    "completion_only_loss": (lambda v: v is not False, "the prompt is pinned and never in the loss"),
    "dataset_text_field": (lambda v: v == "text", "give prompt/completion or messages columns"),
    "lr_scheduler_kwargs": (lambda v: not v, "lr_scheduler_type is constant, linear or cosine"),
    "optim": (lambda v: str(v).startswith("adamw"), "the optimizer is AdamW"),
    "adam_beta1": (lambda v: v == 0.9, "AdamW uses betas (0.9, 0.999)"),
    "adam_beta2": (lambda v: v == 0.999, "AdamW uses betas (0.9, 0.999)"),
    "adam_epsilon": (lambda v: v == 1e-8, "AdamW uses eps 1e-8"),
    "logging_strategy": (lambda v: v == "steps", "metrics are logged every logging_steps steps"),
    "chat_template_kwargs": (lambda v: not v, "chat templates are applied with their defaults"),
    "log_completions_hub_repo": (lambda v: v is None, "completions go to output_dir/completions.jsonl"),
    "resume_from_checkpoint": (lambda v: v in (None, False), "set resume=true or call "
                               "trainer.train(resume_from_checkpoint=...)"),
}
# accepted whatever their value: precision (see `precision`), machinery thoughtfold does not have (data
# loaders, DeepSpeed, vLLM, the Hub, other loss types' knobs) or always uses (the replay backpropagates
# segment by segment, which is what gradient checkpointing would buy)
IGNORED = {
    "bf16", "fp16", "tf32", "model_init_kwargs", "gradient_checkpointing", "gradient_checkpointing_kwargs",
    "run_name", "logging_dir", "logging_first_step", "logging_nan_inf_filter", "log_level",
    "log_level_replica", "remove_unused_columns", "do_train", "do_eval", "do_predict",
    "per_device_eval_batch_size", "data_seed", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_drop_last", "ddp_find_unused_parameters", "ddp_timeout",
    "save_safetensors", "save_only_model", "torch_empty_cache_steps", "include_tokens_per_second",
    "ds3_gather_for_generation", "pad_to_multiple_of", "disable_dropout", "cast_lm_head_to_fp32",
    "log_multimodal", "log_unique_prompts", "ref_model_mixup_alpha", "ref_model_sync_steps",
    "use_bias_correction_kl", "router_aux_loss_coef", "sapo_temperature_neg", "sapo_temperature_pos",
    "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg", "dataset_num_proc",
    "dataset_kwargs", "truncation_mode", "packing_strategy", "padding_free", "eval_packing",
    "assistant_only_loss", "activation_offloading", "eos_token", "pad_token", "chat_template_path",
}
IGNORED_PREFIXES = ("vllm_", "hub_", "use_transformers_", "transformers_continuous_")


def _refused(name: str, value: Any, use: str) -> Any:
    raise ConfigError(f"{name}={value!r} has no counterpart here: {use}")


def _refuse_epoch(name: str, value: Any) -> Any:
    if value != "steps":
        _refused(name, value, f"thoughtfold counts steps: use {name}='steps' or 'no' with "
                 f"{name.replace('strategy', 'steps')}")
    return _KEEP


_KEEP = object()  # a conversion's answer: the value changes nothing (leave our setting as it is)


def is_trl_name(name: str) -> bool:
    """Whether `name` is one of TRL's settings this module knows what to do with."""
    return (name in RENAMED or name in SFT_RENAMED or name in NO_EFFECT or name in IGNORED
            or name in TRL_BATCH_DEFAULTS or name.startswith(IGNORED_PREFIXES))


def translate(given: Mapping[str, Any], setting: Callable[[str], Any],
              trainer: str = "grpo") -> dict[str, tuple[Any, str]]:
    """Our settings (dotted names for nested ones, e.g. ``data.shuffle``) for the TRL-named `given`
    ones, each as (value, the TRL name it comes from); `setting(name)` is the value one of ours has
    (what a translation depends on, such as num_generations). `trainer` ("grpo" or "sft") says whose
    batch a batch size counts. A refused value is a one-line ConfigError saying what to use."""
    out: dict[str, tuple[Any, str]] = {}
    renamed = {**RENAMED, **SFT_RENAMED} if trainer == "sft" else RENAMED
    for name, value in given.items():
        if name in renamed:
            target, convert = renamed[name]
            converted = convert(value)
            if converted is not _KEEP:
                out[target] = (converted, name)
        elif name in NO_EFFECT:
            harmless, use = NO_EFFECT[name]
            if not harmless(value):
                _refused(name, value, use)
    dtype = precision(given)
    if dtype is not None:
        out["dtype"] = (dtype, "bf16/fp16/model_init_kwargs")
    source = " x ".join(k for k in TRL_BATCH_DEFAULTS if k in given)
    out.update({k: (v, source) for k, v in batch_settings(given, setting, trainer).items()})
    return out


def precision(given: Mapping[str, Any]) -> str | None:
    """TRL's bf16 / fp16 flags and model_init_kwargs' dtype as our `dtype` (the base model's; the
    adapters and the encoder stay float32), None for our default. bf16=True is that default already:
    bfloat16 on CUDA (on CPU, where TRL would autocast, the model stays float32)."""
    kwargs = given.get("model_init_kwargs") or {}
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype"))
    if given.get("fp16"):
        dtype = "float16"
    elif given.get("bf16") is False and dtype is None:
        dtype = "float32"
    return None if dtype is None or dtype == "auto" else str(dtype).removeprefix("torch.")


def batch_settings(given: Mapping[str, Any], setting: Callable[[str], Any], trainer: str) -> dict[str, int]:
    """TRL's per_device_train_batch_size x gradient_accumulation_steps (the rows of one optimizer step
    on one process) as prompts_per_step (GRPO: divided by num_generations) and replay_batch_size
    (the micro-batch: per_device_train_batch_size rows)."""
    if not any(k in given for k in TRL_BATCH_DEFAULTS):
        return {}
    per_device, accumulation = (given.get(k) or TRL_BATCH_DEFAULTS[k] for k in TRL_BATCH_DEFAULTS)
    for name, value in zip(TRL_BATCH_DEFAULTS, (per_device, accumulation), strict=True):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a whole number >= 1, got {value!r}")
    rows = per_device * accumulation
    if trainer == "sft":
        return {"prompts_per_step": rows, "replay_batch_size": per_device}
    group = setting("num_generations")
    if rows % group:
        raise ConfigError(
            f"per_device_train_batch_size x gradient_accumulation_steps = {rows} completions is not a "
            f"multiple of num_generations = {group}: thoughtfold counts prompts per step (prompts_per_step "
            "= completions / num_generations, per process); pick sizes whose product divides")
    return {"prompts_per_step": rows // group, "replay_batch_size": per_device}


def settings_object(cls: type, value: Any, name: str) -> Any:
    """`value` as a `cls` (CacheConfig, AdapterConfig, DataConfig): a dict, as TRL users write nested
    settings, converts, with an unknown key a ConfigError that names the closest one."""
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a {cls.__name__} or a dict of its settings, "
                          f"got {type(value).__name__}")
    known = [f.name for f in fields(cls)]
    for key in value:
        if key not in known:
            raise unknown_setting(f"{name}.{key}", [f"{name}.{k}" for k in known], "")
    return cls(**value)


def split_names(cls: type, kwargs: Mapping[str, Any],
                where: str = "") -> tuple[dict[str, Any], dict[str, Any]]:
    """`kwargs` of a settings class `cls` (TrainConfig or a subclass) as (ours, TRL's); a name neither
    knows is a ConfigError suggesting the closest one."""
    known = [f.name for f in fields(cls)]
    ours, trl = {}, {}
    for name, value in kwargs.items():
        sft_loss = cls.trainer == "sft" and name == "loss_type" and value in SFT_LOSS_TYPES
        if name in known and not sft_loss:
            ours[name] = value
        elif is_trl_name(name) or sft_loss:
            trl[name] = value
        else:
            raise unknown_setting(name, known, where or f"{cls.__name__}: ")
    return ours, trl


def with_trl_settings(config: Any, given: Mapping[str, Any], explicit: Sequence[str] = ()) -> Any:
    """`config` (a TrainConfig) with the TRL-named `given` settings applied; one that a setting in
    `explicit` (the names the user gave) also sets is a ConfigError."""
    changes: dict[str, Any] = {}
    for name, (value, source) in translate(given, lambda n: getattr(config, n), config.trainer).items():
        top, _, sub = name.partition(".")
        if top in explicit and not sub:
            raise ConfigError(f"{source} and {top} set the same thing; keep one")
        changes[top] = replace(changes.get(top, getattr(config, top)), **{sub: value}) if sub else value
    return replace(config, **changes) if changes else config


def accept_trl_names(cls: type) -> type:
    """Make `cls(...)` take TRL's names too (translated), and turn an unknown name into a one-line
    ConfigError instead of a TypeError."""
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs) -> None:
        ours, trl = split_names(type(self), kwargs)
        init(self, *args, **ours)
        if trl:
            self.__dict__.update(with_trl_settings(self, trl, explicit=list(ours)).__dict__)

    cls.__init__ = __init__
    return cls


def adapter_from_peft(peft_config: Any, adapter: Any) -> Any:
    """`adapter` (an AdapterConfig) with the rank, alpha and target modules of a PEFT `LoraConfig`,
    in lora mode unless it is pte already; PEFT options these adapters lack are refused in one line
    (a nonzero lora_dropout is only warned about: there is no dropout here)."""
    if not hasattr(peft_config, "r") or not hasattr(peft_config, "lora_alpha"):
        raise ConfigError(f"peft_config must be a peft LoraConfig, got {type(peft_config).__name__}")
    for name, default, use in (("use_dora", False, "adapters are LoRA's (mode lora) or PTE's"),
                               ("use_rslora", False, "the scaling is alpha / r"),
                               ("bias", "none", "only the low-rank matrices train"),
                               ("modules_to_save", None, "only the low-rank matrices train")):
        if getattr(peft_config, name, default) not in (default, [], ()):
            _refused(f"peft_config.{name}", getattr(peft_config, name), use)
    if getattr(peft_config, "lora_dropout", 0.0):
        log.warning("peft_config.lora_dropout=%s is not applied: these adapters have no dropout",
                    peft_config.lora_dropout)
    targets = peft_config.target_modules
    if isinstance(targets, str) and targets != "all-linear":
        _refused("peft_config.target_modules", targets, "give a list of module names, or 'all-linear'")
    targets = type(adapter)().target_modules if targets in (None, "all-linear") else tuple(sorted(targets))
    mode = adapter.mode if adapter.mode in ("lora", "pte") else "lora"
    return replace(adapter, mode=mode, rank=int(peft_config.r), alpha=float(peft_config.lora_alpha),
                   target_modules=targets)


def report_backends(value: Any) -> list[str]:
    """`report_to` as TRL takes it (a name, a list, "none" or "all") as the list of backends, each
    checked to be installed: "all" is every installed one, "none" (or an empty list) none."""
    names = [value] if isinstance(value, str) else list(value or [])
    if names in (["none"], ["None"]):
        return []
    if "all" in names:
        return [b for b, package in REPORT_BACKENDS.items() if importlib.util.find_spec(package) is not None]
    for name in names:
        if name not in REPORT_BACKENDS:
            choices = ", ".join(REPORT_BACKENDS)
            raise ConfigError(f"report_to accepts {choices}, 'all' or 'none', got {name!r}")
        package = REPORT_BACKENDS[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"report_to {name} needs the {package} package: pip install {package} "
                              "(or report_to none: metrics.jsonl is always written)")
    return names


def unknown_setting(name: str, known: list[str], where: str) -> ConfigError:
    """The error for a setting neither thoughtfold nor TRL's table knows: a transformers
    TrainingArguments field is named as such, anything else gets the closest known name."""
    import difflib

    if _is_training_argument(name):
        return ConfigError(f"{where}{name!r} is a transformers TrainingArguments setting with no counterpart "
                           "here: remove it")
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}unknown setting {name!r}{hint}")


def _is_training_argument(name: str) -> bool:
    try:
        from transformers import TrainingArguments
    except ImportError:
        return False
    return name in {f.name for f in fields(TrainingArguments)}
