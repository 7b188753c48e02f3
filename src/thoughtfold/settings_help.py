"""One line of help per training setting, the single source of what `help(TrainConfig)` lists and
what `thoughtfold grpo --help` / `sft --help` print (with each setting's default). Nested settings
are named as in YAML and overrides (`cache.window`). Plain strings: no torch, no transformers."""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

SETTINGS_HELP: dict[str, str] = {
    "model": "hub id, local directory, or 'default' (the bundled SmolLM2-135M-Instruct)",
    "dtype": "base model dtype: float32, bfloat16, float16, float64 (null: bfloat16 on CUDA, else float32)",
    "device": "cpu, cuda or cuda:N (null: cuda if available; under torchrun each process's own)",
    "compile_decode": "torch.compile the rollouts' decode step (worth it on CUDA)",
    "fsdp": "under torchrun: also shard the frozen base weights over the processes (FSDP2)",
    "cache.window": "thought tokens kept in the cache (null: full cache, no eviction)",
    "cache.evict_ratio": "fraction of the window evicted (and folded into the state) at once, in (0, 1]",
    "cache.eviction": "which tokens leave: oldest (sliding window), or by attention: h2o, snapkv, headkv",
    "cache.observe_window": "scored evictions: newest thought tokens never evicted (null: automatic)",
    "adapter.mode": "none (base model), lora (static low-rank adapter) or pte (state-modulated adapter)",
    "adapter.rank": "adapter rank r (also the state's size, r x r)",
    "adapter.alpha": "adapter scaling numerator: the update is scaled by alpha / rank",
    "adapter.global_tokens": "pte: learned global tokens the encoder always attends to",
    "adapter.target_modules": "linear layers that get an adapter (names inside each decoder layer)",
    "adapter.state_update": "pte: exact (online softmax over all evicted tokens), paper (RMSNorm per block)",
    "adapter.global_only": "pte ablation: freeze the state at its global-token value",
    "adapter.encoder_dim": "pte: width of the encoder's query/key space (null: the rank)",
    "adapter.residual": "pte: B (I + S) A, LoRA_c's path plus the state's (default false: the paper's B S A)",
    "data.dataset": "arith[:preset], recall[:steps=N], a bundled set (gsm8k, math, ...), a Hub id or a file",
    "data.split": "dataset split (null: the set's training split)",
    "data.limit": "first N rows only (null: all)",
    "data.prompt_field": "column holding the prompt (null: guessed: prompt, problem, question, ...)",
    "data.answer_field": "column holding the gold answer (null: guessed: answer, solution, ...)",
    "data.completion_field": "SFT: column holding the target trace (completion is used when it is absent)",
    "data.system_prompt": "system message added to text prompts (null: none)",
    "data.chat_template": "apply the tokenizer's chat template to prompts",
    "data.shuffle": "reshuffle the dataset every epoch (TRL: shuffle_dataset)",
    "rewards": "GRPO rewards unless GRPOTrainer gets reward_funcs: built-in names or module:function",
    "reward_weights": "one weight per reward (null: all 1)",
    "reward_timeout": "seconds one reward call may take; a slower one ends the run (null: no limit)",
    "num_generations": "completions sampled per prompt (the GRPO group)",
    "prompts_per_step": "prompts per optimizer step and process (TRL: per_device_train_batch_size x "
                        "gradient_accumulation_steps / num_generations)",
    "max_completion_length": "new tokens per completion (SFT: target traces are cut here)",
    "temperature": "sampling temperature of the rollouts (> 0)",
    "top_p": "nucleus sampling of the rollouts (1: off)",
    "top_k": "top-k sampling of the rollouts (0: off)",
    "learning_rate": "AdamW learning rate of the adapters",
    "encoder_lr_ratio": "the thought encoder's learning rate / learning_rate",
    "weight_decay": "AdamW weight decay",
    "lr_scheduler_type": "constant, linear or cosine (after the warmup)",
    "warmup_steps": "steps of linear warmup",
    "warmup_ratio": "warmup as a fraction of the run (null: warmup_steps; when set, it decides them)",
    "max_grad_norm": "gradient clipping norm (0: off)",
    "loss_type": "GRPO loss normalisation: grpo, bnpo, dapo or dr_grpo (as TRL)",
    "epsilon": "low clip bound of the probability ratio",
    "epsilon_high": "high clip bound (null: epsilon)",
    "beta": "KL coefficient to the adapter-disabled model under the same cache (0: no reference pass)",
    "scale_rewards": "advantage scaling: group, batch or none (TRL's true/false: group/none)",
    "filter_zero_std": "skip replaying groups whose rewards all agree (they carry no gradient)",
    "zero_std_norm": "with filter_zero_std: normalise the loss over the kept rows or the whole batch (TRL)",
    "mask_truncated_completions": "keep completions cut at max_completion_length out of the loss",
    "num_iterations": "optimizer updates per batch of rollouts",
    "sft_targets": "SFT targets: the dataset's traces, or full_cache traces the base model samples",
    "sft_loss": "SFT loss: nll (cross-entropy on the targets) or kl (distillation from the full cache)",
    "distill_tokens": "sft_loss=kl: the tokens after each row's first eviction, or all",
    "distill_top_k": "sft_loss=kl: teacher entries kept per token, plus the rest's mass (null: all)",
    "backprop": "how replay gradients cross evictions: state (exact), truncated, or full (one graph)",
    "generation_batch_size": "sequences decoding at once in a rollout, continuous batching (null: all); "
                             "does not change results",
    "replay_batch_size": "rows replayed together per backward (null: all): the update's micro-batch",
    "replay_memory_gb": "GiB of activations and logits one replay micro-batch may hold: rows are chosen "
                        "to fit (null: no limit)",
    "max_steps": "optimizer steps of the run",
    "num_train_epochs": "run length in passes over the dataset (null: max_steps; when set, it decides them)",
    "save_steps": "checkpoint every N steps (0: only at the end)",
    "logging_steps": "a metrics line (and the bar's postfix) every N steps, with means over them",
    "eval_steps": "evaluate the trainer's eval_dataset every N steps and at the end (null: at the end only)",
    "log_completions": "show sample completions every logged step, and keep them in completions.jsonl",
    "num_completions_to_print": "completions shown per logged step with log_completions (null: all)",
    "save_total_limit": "checkpoints kept (null: all)",
    "output_dir": "where checkpoints, metrics.jsonl, the adapter and the plot go",
    "overwrite_output_dir": "start over in an output_dir that holds checkpoints (deletes them)",
    "resume": "continue from the last intact checkpoint in output_dir",
    "seed": "seed of the adapter init, data order and rollouts",
    "report_to": "tensorboard, wandb, all or none (metrics.jsonl is always written)",
    "progress": "show the progress bar",
}


def default_settings(config: Any, prefix: str = "") -> dict[str, Any]:
    """Every setting of a settings object (a dataclass instance) by name, nested ones dotted
    (`cache.window`), in field order."""
    out: dict[str, Any] = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if is_dataclass(value):
            out.update(default_settings(value, f"{prefix}{f.name}."))
        else:
            out[f"{prefix}{f.name}"] = value
    return out


def describe_fields(defaults: dict[str, Any], indent: str = "    ") -> str:
    """The settings as docstring lines: name (default): what it does."""
    lines = [f"{indent}{name} ({shown_value(value)}): {SETTINGS_HELP[name]}"
             for name, value in defaults.items()]
    return f"\n\n{indent}Settings (name (default): meaning):\n" + "\n".join(lines) + "\n"


def shown_value(value: Any) -> str:
    """A setting's value as YAML and the command line write it (null, true, [a, b])."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)
