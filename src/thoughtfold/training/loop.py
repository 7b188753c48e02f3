"""The training loop the trainers share (`GRPOTrainer` in grpo.py, `SFTTrainer` in sft.py): the
model, the data order, the optimiser and its schedule, checkpoints and the metrics log. A trainer
supplies `train_step`; the loop runs it to `max_steps`.

The settings are a `TrainConfig` (config.py); each step's metrics go to metrics.py's log.
Checkpoints (checkpoint.py; written, restored and resumed by run_dir.py) make a run resumable
exactly, even after a SIGKILL. Under `torchrun` each process takes its share of the prompts and
replays through a `ReplayPlan` (distributed.py), which is all a trainer needs to know about processes.
"""

from __future__ import annotations

import logging
import math
import os
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..config import TrainConfig
from ..config_files import RUN_CONFIG_NAME, config_to_yaml
from ..engine.encoder import EncoderState
from ..errors import ConfigError, DataError, RewardError
from ..persist import atomic_write_text, lock_directory
from ..policy import Policy
from ..render import plot_curves
from ..rows import check_rows
from ..tasks.data import load_dataset_by_name
from ..tasks.example import with_prompt_column
from ..tasks.rewards import keep_traceback
from ..trl_names import adapter_from_peft
from .callbacks import Callbacks, new_state
from .checkpoint import ADAPTER_DIR
from .diagnostics import ParameterDiagnostics, join_states, state_metrics
from .distributed import DataParallel, ReplayPlan
from .metrics import METRICS_NAME, StepMemory, mean_metrics, read_metrics
from .progress import RunView
from .run_dir import RunDirectory

log = logging.getLogger("thoughtfold")

TRAINER_ARGUMENTS = """

    Arguments, as TRL's trainers take them:

    - `model`: a `Policy`, trained as it is (its cache and adapter settings win over `args`'), a
      model id or path loaded with `args`' cache and adapter settings, or None for `args.model`.
    - `args`: a TrainConfig / GRPOConfig / SFTConfig (default: the quickstart run).
    - `train_dataset`: rows (a list of dicts, a `datasets.Dataset`) with a prompt (text, messages or
      token ids; a "question" or "problem" column is found as in files) and the columns the rewards
      read; replaces `args.data`. `eval_dataset`: rows evaluated under the cache every `eval_steps`
      steps and at the end.
    - `processing_class`: the tokenizer to use instead of the model's own.
    - `callbacks`: transformers `TrainerCallback`s (instances or classes): the loop calls their
      on_train_begin / on_step_begin / on_step_end / on_log / on_evaluate / on_save / ... hooks and
      obeys the control they return (`should_training_stop`, `should_save`, ...).
    - `peft_config`: a PEFT `LoraConfig`, mapped to the adapter (rank, alpha, target modules).
    """


class Trainer(RunDirectory):
    """The parts GRPO and SFT share: model, data order, optimizer and schedule, checkpoints, logs,
    evaluation and callbacks, with the surface of TRL's trainers (`args`, `state`, `train`,
    `evaluate`, `save_model`, `add_callback`)."""

    kind = "train"
    plot_key = "loss"

    def __init__(self, model: Policy | str | None = None, args: TrainConfig | None = None,
                 train_dataset: Iterable[dict] | None = None, eval_dataset: Iterable[dict] | None = None,
                 processing_class: Any = None, callbacks: Iterable[Any] | None = None,
                 peft_config: Any = None):
        if model is not None and not isinstance(model, (Policy, str)):
            raise ConfigError("model must be a thoughtfold Policy, a model id or path, or None "
                              f"(args.model), got {type(model).__name__}")
        args = args if args is not None else TrainConfig()
        # the model given here is the run's: the saved config.yaml must say so for a resume
        if isinstance(model, Policy):
            args = replace(args, model=model.base_model, cache=model.cache_config,
                           adapter=model.adapter_config)
        self.config = replace(args, model=model) if isinstance(model, str) else args
        if peft_config is not None:
            if isinstance(model, Policy):
                raise ConfigError("peft_config with a Policy: the Policy has its adapter already; pass a "
                                  "model id")
            self.config = replace(self.config, adapter=adapter_from_peft(peft_config, self.config.adapter))
        self.callbacks = Callbacks(self, callbacks)
        self.output_dir = Path(self.config.output_dir)
        self.dp = DataParallel()
        random.seed(self.config.seed)
        torch.manual_seed(self.config.seed)  # same adapter init on every process
        self.dataset = self._load_dataset(train_dataset)
        self.config = self.config.for_dataset(len(self.dataset), self.dp.world)  # epochs, warmup ratio
        self.eval_dataset = None if eval_dataset is None else self._rows(eval_dataset, "eval_dataset")
        self._refusal: ConfigError | None = None  # why train() may not start here unless it resumes
        # one run per output_dir, until train() ends; taken before the model loads
        self._lock = lock_directory(self.output_dir, "training run") if self.dp.main else None
        self._check_output_dir()
        self.policy = model if isinstance(model, Policy) else self._load_policy()
        if processing_class is not None:
            self.policy.tokenizer = getattr(processing_class, "tokenizer", processing_class)
        c = self.config
        for rows, name in ((self.dataset, "dataset"), (self.eval_dataset, "eval_dataset")):
            if rows is not None:  # every row, before step 1 (and before the first evaluation)
                check_rows(self.policy, rows, c.data.chat_template, c.data.system_prompt,
                           self._completion_tokens, "max_completion_length", name)
        self._setup_optimisation()
        self.state = new_state(self, [])
        self.callbacks.call("on_init_end")

    def _setup_optimisation(self) -> None:
        """Replay plan, trainable tensors, optimizer, schedule, the run's position (resumed if asked)."""
        config = self.config
        self.replays = ReplayPlan.for_run(self.policy, self.dp, config)
        self.params = self.policy.trainable_parameters()
        if not self.params:
            raise ConfigError("adapter mode 'none' has nothing to train: set adapter.mode to lora or pte")
        self.diagnostics = ParameterDiagnostics(self.policy.parameter_groups())
        self._state_diagnostics: dict[str, float] = {}
        self._replayed_states: list[EncoderState] = []  # each replay micro-batch's final state, this update
        self.optimizer = torch.optim.AdamW(self._optimizer_groups(), lr=config.learning_rate,
                                           weight_decay=config.weight_decay)
        self.scheduler = self._make_scheduler()
        self.step = 0
        self.data_pos = 0
        self._orders: dict[int, list[int]] = {}
        self._saved_step = -1
        self.last_completions: list[dict] = []  # the last step's completions, for log_completions
        if config.resume:
            self._resume()
        self.output_dir.mkdir(parents=True, exist_ok=True)

    @property
    def args(self) -> TrainConfig:
        """The run's settings (TRL's name for them)."""
        return self.config

    def add_callback(self, callback: Any) -> None:
        self.callbacks.add(callback)

    def pop_callback(self, callback: Any) -> Any:
        return self.callbacks.pop(callback)

    def remove_callback(self, callback: Any) -> None:
        self.callbacks.pop(callback)

    # ---- setup

    def _load_dataset(self, dataset: Iterable[dict] | None) -> list[dict]:
        d = self.config.data
        if dataset is not None:
            return self._rows(dataset, "train_dataset")
        rows = load_dataset_by_name(d.dataset, d.split, d.limit, d.prompt_field, d.answer_field)
        if not rows:
            raise DataError(f"dataset {d.dataset!r} has no examples")
        return rows

    def _rows(self, dataset: Iterable[dict], name: str) -> list[dict]:
        """A given dataset's rows, each a dict with its prompt under "prompt"."""
        if isinstance(dataset, (str, bytes, dict)):
            raise DataError(f"{name} must be rows (a list of dicts or a datasets.Dataset), got "
                            f"{type(dataset).__name__}; a dataset name goes in data.dataset")
        rows = [self._row(row, f"{name} row {i}") for i, row in enumerate(dataset)]
        if not rows:
            raise DataError(f"{name} has no rows")
        return rows

    def _row(self, row: Any, where: str) -> dict:
        """One given row as a dict with its prompt under "prompt" (tasks.example.with_prompt_column)."""
        if not isinstance(row, Mapping):
            raise DataError(f"{where}: a row must be a mapping with a 'prompt' (got {type(row).__name__})")
        return with_prompt_column(dict(row), self.config.data.prompt_field, where)

    def _load_policy(self) -> Policy:
        c = self.config
        return Policy.from_pretrained(c.model, cache=c.cache, adapter=c.adapter, dtype=c.dtype,
                                      device=c.device or self.dp.device(), compile_decode=c.compile_decode)

    def _optimizer_groups(self) -> list[dict]:
        """The adapters at `learning_rate`, the thought encoder at `encoder_lr_ratio` times it."""
        encoder = {id(p) for p in self.policy.parameter_groups().get("encoder", [])}
        groups = [{"params": [p for p in self.params if id(p) not in encoder]}]
        if encoder:
            groups.append({"params": [p for p in self.params if id(p) in encoder],
                           "lr": self.config.learning_rate * self.config.encoder_lr_ratio})
        return groups

    def _make_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        """HF's schedules (warmup then constant / linear / cosine decay), one tick per optimizer update."""
        from transformers import get_scheduler

        c = self.config
        name = "constant_with_warmup" if c.lr_scheduler_type == "constant" else c.lr_scheduler_type
        updates = c.max_steps * self.updates_per_step
        return get_scheduler(name, self.optimizer, num_warmup_steps=c.warmup_steps * self.updates_per_step,
                             num_training_steps=updates)

    @property
    def updates_per_step(self) -> int:
        return 1

    def _completion_tokens(self, row: dict, where: str) -> int:
        """How many completion tokens `row` needs next to its prompt: what a rollout may generate."""
        return self.config.max_completion_length

    # ---- data

    def next_examples(self, n: int) -> list[dict]:
        """The next `n` rows of the (per-epoch reshuffled) dataset; a pure function of data_pos."""
        out = []
        for _ in range(n):
            epoch, i = divmod(self.data_pos, len(self.dataset))
            out.append(self.dataset[self._order(epoch)[i]])
            self.data_pos += 1
        return out

    def local_examples(self) -> list[dict]:
        """This process's `prompts_per_step` rows of the next global batch (all processes advance
        through the same order, so the global batch is what one process would have drawn)."""
        n = self.config.prompts_per_step
        return self.next_examples(n * self.dp.world)[self.dp.local_rows(n)]

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            order = list(range(len(self.dataset)))
            if self.config.data.shuffle:
                random.Random(f"{self.config.seed}:{epoch}").shuffle(order)
            self._orders = {epoch: order}
        return self._orders[epoch]

    # ---- optimisation

    def record_replayed_state(self) -> None:
        """Keep the final state of the replay micro-batch that just ran (PTE), for the state
        diagnostics of the coming update."""
        if self.policy.encoder is not None and self.policy.folder.last is not None:
            self._replayed_states.append(self.policy.folder.last)

    def optimizer_step(self) -> float:
        """Clip, step, tick the schedule; returns the pre-clip gradient norm."""
        self.dp.sum_gradients(self.params)
        self.diagnostics.record_gradients()
        if self._replayed_states:
            # the states the replay just folded, read with the encoder that folded them (before the update)
            self._state_diagnostics = state_metrics(self.policy.encoder, join_states(self._replayed_states))
            self._replayed_states = []
        limit = self.config.max_grad_norm if self.config.max_grad_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(self.params, limit)
        self.callbacks.call("on_pre_optimizer_step")
        self.optimizer.step()
        self.callbacks.call("on_optimizer_step")
        self.scheduler.step()
        return float(norm)

    def train_step(self, examples: list[dict]) -> dict[str, float]:
        """One step on this process's `examples`; returns the step's metrics (the trainers' own)."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        """Metrics of the eval_dataset under the cache, named eval_* as TRL names them."""
        raise NotImplementedError

    # ---- checkpoints

    # ---- the loop

    def train(self, resume_from_checkpoint: bool | str | os.PathLike | None = None) -> dict[str, Path | None]:
        """Run to `max_steps`, checkpointing every `save_steps` steps and at the end, logging every
        `logging_steps` steps (and at each checkpoint, evaluation and the last step); returns the
        paths of the adapter, the metrics log and the plot. `resume_from_checkpoint`: True continues
        from the last intact checkpoint in output_dir (as `resume=true`), a path from that
        checkpoint. Releases the output directory's lock."""
        try:
            if resume_from_checkpoint:
                self._resume_from(resume_from_checkpoint)
            elif self._refusal is not None:
                raise self._refusal
            return self._train()
        except RewardError as e:  # one line on the command line; the traceback in the run's errors.log
            raise keep_traceback(e, self.output_dir) from None
        finally:
            if self._lock is not None:
                self._lock.close()

    def _calibrate_heads(self) -> None:
        """headkv's head weights, unless the policy has them (from a checkpoint, an adapter, or a call of
        its own): calibrated on the run's first global batch of prompts, the same on every process, so
        that processes evict alike and any resume finds them in its checkpoint."""
        c, policy = self.config, self.policy
        if policy.cache_config.eviction != "headkv" or policy.eviction_policy is not None \
                or policy.head_weights is not None:
            return
        position, self.data_pos = self.data_pos, 0
        rows = self.next_examples(c.prompts_per_step * self.dp.world)
        self.data_pos = position
        prompts = policy.encode([r["prompt"] for r in rows], c.data.chat_template, c.data.system_prompt)
        policy.calibrate_heads(prompts, c.max_completion_length)

    def _train(self) -> dict[str, Path | None]:
        self._calibrate_heads()
        if self.dp.main:
            atomic_write_text(self.output_dir / RUN_CONFIG_NAME, config_to_yaml(self.config))
        self.state = new_state(self, read_metrics(self.output_dir / METRICS_NAME))
        view = RunView(self)
        self.callbacks.call("on_train_begin")
        self.callbacks.call("on_epoch_begin")
        unlogged: list[dict[str, float]] = []  # the steps since the last log line
        try:
            while self.step < self.config.max_steps and not self.callbacks.control.should_training_stop:
                unlogged.append(self._callback_step(view))
                unlogged = self._log_save_evaluate(unlogged, view)
        finally:
            view.close()
        if self._saved_step != self.step:
            self.save_checkpoint()
        paths = self._finish()
        self.callbacks.call("on_train_end")
        view.finish(self.kind, self.state.log_history)
        return paths

    def _callback_step(self, view: RunView) -> dict[str, float]:
        """One step between the on_step_begin and on_step_end callbacks; the bar shows its numbers."""
        self.callbacks.call("on_step_begin")
        epoch = self.data_pos // len(self.dataset)
        record = self._timed_step()
        view.stepped(record)
        self.state.global_step, self.state.epoch = self.step, record["epoch"]
        if self.data_pos // len(self.dataset) > epoch:
            self.callbacks.call("on_epoch_end")
            self.callbacks.call("on_epoch_begin")
        self.callbacks.call("on_step_end")
        return record

    def _log_save_evaluate(self, unlogged: list[dict[str, float]], view: RunView) -> list[dict[str, float]]:
        """Evaluate, log and checkpoint as the settings and the callbacks' control ask; returns the
        steps not logged yet."""
        c, control = self.config, self.callbacks.control
        checkpoint = (bool(c.save_steps) and self.step % c.save_steps == 0) or control.should_save
        last = self.step == c.max_steps or control.should_training_stop
        periodic = bool(c.eval_steps) and self.step % c.eval_steps == 0
        evaluate = self.eval_dataset is not None and (periodic or last or control.should_evaluate)
        # a checkpoint always logs: a resumed run then logs the same lines as an uninterrupted one
        if checkpoint or evaluate or last or control.should_log or self.step % c.logging_steps == 0:
            metrics, unlogged = mean_metrics(unlogged), []
            if evaluate:
                evaluation = self.evaluate()
                self.callbacks.call("on_evaluate", metrics=evaluation)
                metrics.update(evaluation)
            self.state.log_history.append(metrics)
            view.log(metrics, self.last_completions)
            self.callbacks.call("on_log", logs=metrics)
        if checkpoint:
            self.save_checkpoint()
            self.callbacks.call("on_save")
        control.should_log = control.should_save = control.should_evaluate = False
        return unlogged

    def _timed_step(self) -> dict[str, float]:
        memory = StepMemory(self.policy.device)
        memory.start()  # the step's own peak
        lr = self.scheduler.get_last_lr()[0]
        start = time.perf_counter()
        metrics = self.train_step(self.local_examples())
        self.step += 1
        metrics.update(self.diagnostics.metrics())
        metrics.update(self._state_diagnostics)
        return {"step": self.step, "epoch": self.data_pos / len(self.dataset), "learning_rate": lr, **metrics,
                **memory.metrics(), "step_seconds": time.perf_counter() - start}

    def save_model(self, output_dir: str | os.PathLike | None = None) -> Path:
        """Write the adapter (as `Policy.save_adapter`) to `output_dir`, by default where train() puts
        it (args.output_dir/adapter); returns the directory."""
        target = Path(output_dir) if output_dir is not None else self.output_dir / ADAPTER_DIR
        if self.dp.main:
            self.policy.save_adapter(target)
        self.dp.barrier()
        return target

    def _finish(self) -> dict[str, Path | None]:
        adapter = self.output_dir / ADAPTER_DIR
        metrics_path = self.output_dir / METRICS_NAME
        plot_path = self.output_dir / f"{self.plot_key}.png"
        self.save_model(adapter)
        if self.dp.main:
            plot_path = plot_curves({self.kind: read_metrics(metrics_path)}, self.plot_key, plot_path,
                                    self.output_dir.name)
        self.dp.barrier()
        return {"adapter": adapter, "metrics": metrics_path, "plot": plot_path}


Trainer.__doc__ += TRAINER_ARGUMENTS  # help() shows what the constructor takes
