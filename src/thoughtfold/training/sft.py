"""`SFTTrainer`: supervised fine-tuning through the replay, called as TRL's (`SFTTrainer(model, args,
train_dataset)`). Cross-entropy on given traces, or (`sft_loss: kl`) the KL from the full-cache
teacher's next-token distributions, teaches the bounded-cache policy to reproduce full-cache
reasoning (the paper's goal pi^D ~ pi), with the memory of the replay: bounded by the window, not by
the trace length.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from ..checks import is_token_ids
from ..config import CacheConfig, TrainConfig
from ..engine.adapter import adapters_disabled
from ..engine.replay import default_schedule
from ..errors import ConfigError, DataError
from ..messages import is_conversation, split_messages, text_of
from ..policy import Policy
from ..rows import row_location
from .distill import TeacherTargets, first_distilled_token, teacher_targets, token_kl
from .loop import TRAINER_ARGUMENTS, Trainer
from .losses import loss_mask


class SFTTrainer(Trainer):
    """Cross-entropy through the replay: teaches the bounded-cache policy to reproduce full-cache
    reasoning. Called as TRL's: `SFTTrainer(model, args, data_collator, train_dataset, eval_dataset,
    processing_class, callbacks=..., peft_config=...)` (`data_collator` must be None: batches are
    built here). Targets are the dataset's traces (`sft_targets: dataset`)
    or completions the base model samples under a full cache for each batch (`sft_targets:
    full_cache`). Rows in TRL's formats: `prompt` + `completion` (text or messages), `messages`
    (the final assistant turn is learned, the rest is the prompt), or `prompt` + the column
    `data.completion_field`; traces are cut at `max_completion_length`. `prompts_per_step` traces
    make one batch, with the token-mean loss over the whole batch."""

    kind = "sft"
    plot_key = "loss"

    def __init__(self, model: Policy | str | None = None, args: TrainConfig | None = None,
                 data_collator: Any = None, train_dataset: Iterable[dict] | None = None,
                 eval_dataset: Iterable[dict] | None = None, processing_class: Any = None,
                 callbacks: Iterable[Any] | None = None, peft_config: Any = None):
        if data_collator is not None:
            raise ConfigError("data_collator must be None: SFTTrainer builds its batches itself (prompts "
                              "pinned, targets replayed segment by segment)")
        super().__init__(model, args, train_dataset, eval_dataset, processing_class, callbacks, peft_config)

    def _row(self, row: Any, where: str) -> dict:
        """A given row in TRL's SFT formats as a prompt plus its target under completion_field."""
        return super()._row(self._sft_row(dict(row), where) if isinstance(row, Mapping) else row, where)

    def _load_dataset(self, dataset: Iterable[dict] | None) -> list[dict]:
        rows = super()._load_dataset(dataset)
        return rows if dataset is not None else [self._sft_row(row, row_location(row, i)) for i, row in
                                                 enumerate(rows)]

    def _sft_row(self, row: dict, where: str) -> dict:
        """`row` with its target (text or token ids) under data.completion_field: taken from there,
        from TRL's `completion` column, or from the final assistant turn of `messages`."""
        field_name = self.config.data.completion_field
        if "messages" in row and "prompt" not in row:
            row["prompt"], row[field_name] = split_messages(row.pop("messages"), where)
        elif field_name not in row and "completion" in row:
            row[field_name] = row.pop("completion")
        target = row.get(field_name)
        if is_conversation(target):
            row[field_name] = target = text_of(target)
        if self.config.sft_targets == "full_cache":
            return row
        if not (isinstance(target, str) and target or is_token_ids(target)):
            raise DataError(f"{where} has no text or token ids in {field_name!r}, 'completion' or 'messages' "
                            "(the SFT target; set data.completion_field)")
        return row

    def _completion_tokens(self, row: dict, where: str) -> int:
        """The tokens of the row's target as trained (token ids checked against the vocabulary)."""
        if self.config.sft_targets == "full_cache":
            return self.config.max_completion_length
        target = row[self.config.data.completion_field]
        vocab = self.policy.model.get_input_embeddings().num_embeddings
        if isinstance(target, list) and max(target) >= vocab:
            raise DataError(f"{where}: the target {self.config.data.completion_field!r} has token id "
                            f"{max(target)}, but the model's vocabulary has ids 0 to {vocab - 1}")
        return len(self._target_ids(target))

    def train_step(self, examples: list[dict]) -> dict[str, float]:
        """One update on a batch of traces; `loss` is the token-mean loss before the update: the NLL of
        the targets, or (`sft_loss: kl`) the KL from the teacher's distributions to the policy's."""
        c, device = self.config, self.policy.device
        prompt_ids, completions = self._traces(examples)
        width = self.replays.width(completions)
        logs = self.policy.eviction_logs(prompt_ids, completions)  # None: the default schedule
        targets, starts = None, None
        if c.sft_loss == "kl":
            targets = teacher_targets(self.policy, prompt_ids, completions, c.distill_top_k, width)
            schedules = logs or [default_schedule(len(x), self.policy.cache_config) for x in completions]
            starts = [first_distilled_token(log, c.distill_tokens == "after_eviction") for log in schedules]
        mask = loss_mask([len(x) for x in completions], width, starts).to(device)
        num_tokens = self.dp.sum([int(mask.sum())])[0]
        weights = mask / max(num_tokens, 1)
        loss = 0.0
        self.optimizer.zero_grad(set_to_none=True)
        spans = self.replays.spans(len(completions), width, True, max(map(len, prompt_ids)),
                                   "tokens" if targets is None else "distribution")
        for a, b in spans:
            part = None if targets is None else targets.rows(list(range(a, b)), 0, width)
            loss += self._replay_loss(prompt_ids[a:b], completions[a:b], None if logs is None else logs[a:b],
                                      weights[a:b], part)
        grad_norm = self.optimizer_step()
        return {"loss": self.dp.sum([loss])[0], "grad_norm": grad_norm, "num_tokens": num_tokens}

    def _traces(self, examples: list[dict]) -> tuple[list[list[int]], list[list[int]]]:
        """The prompts' token ids and the target traces of `examples`."""
        c = self.config
        prompts = [e["prompt"] for e in examples]
        prompt_ids = self.policy.encode(prompts, c.data.chat_template, c.data.system_prompt)
        if c.sft_targets == "full_cache":
            return prompt_ids, self._full_cache_traces(prompt_ids)
        return prompt_ids, [self._target_ids(e[c.data.completion_field]) for e in examples]

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The token-mean cross-entropy of the eval_dataset's traces under the cache (eval_loss) and
        their token count (eval_num_tokens), as TRL's SFTTrainer reports them."""
        if self.eval_dataset is None:
            raise ConfigError("evaluate() needs an eval_dataset: pass one to the trainer")
        prompt_ids, completions = self._traces(self.eval_dataset)
        logprobs = self.policy.replay_logprobs(prompt_ids, completions,
                                               self.policy.eviction_logs(prompt_ids, completions))
        tokens = sum(len(c) for c in completions)
        loss = -sum(float(lp.sum()) for lp in logprobs) / max(tokens, 1)
        return {"eval_loss": loss, "eval_num_tokens": tokens}

    def _replay_loss(self, prompt_ids: list[list[int]], completions: list[list[int]], logs: list | None,
                     weights: torch.Tensor, targets: TeacherTargets | None) -> float:
        """Backward of one micro-batch's weighted loss, segment by segment (the NLL, or with
        `targets` the KL from them); returns its value."""
        loss = 0.0

        def loss_fn(lp: torch.Tensor, start: int, end: int, rows: list[int]) -> torch.Tensor:
            nonlocal loss
            terms = -lp if targets is None else token_kl(lp, targets.rows(rows, start, end))
            total = (terms * weights[rows, start:end]).sum()
            loss += total.item()
            return total

        self.replays.replay(prompt_ids, completions, logs, weights.shape[1], loss_fn=loss_fn,
                            loss_input="tokens" if targets is None else "distribution")
        self.record_replayed_state()
        return loss

    def _full_cache_traces(self, prompt_ids: list[list[int]]) -> list[list[int]]:
        """What the base model (adapters off) samples under a full cache: the behaviour the bounded
        policy should imitate. Seeds follow (seed, step, process), so a resumed run sees the same."""
        c, policy = self.config, self.policy
        full_cache = policy.using_cache(CacheConfig(window=None))
        with torch.no_grad(), adapters_disabled(policy.wrappers), full_cache:
            seed = random.Random(f"sft:{c.seed}:{self.step}:{self.dp.rank}").randrange(2**31)
            result = policy.generate(prompt_ids, **c.sampling(seed).to_dict(), chat_template=False)
        return result.completion_ids

    def _target_ids(self, target: str | list[int]) -> list[int]:
        """The trace's tokens plus EOS (no EOS when cut at max_completion_length: the trace goes on). A
        token-id target is taken as it is (its own EOS included), cut at max_completion_length."""
        if isinstance(target, list):
            return target[: self.config.max_completion_length]
        tokenizer = self.policy.tokenizer
        ids = tokenizer.encode(target, add_special_tokens=False)
        if len(ids) >= self.config.max_completion_length or tokenizer.eos_token_id is None:
            return ids[: self.config.max_completion_length]
        return ids + [tokenizer.eos_token_id]


SFTTrainer.__doc__ += TRAINER_ARGUMENTS  # help() shows what the constructor takes

__all__ = ["SFTTrainer"]
