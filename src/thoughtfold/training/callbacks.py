"""transformers' trainer callbacks (what TRL's trainers take) in thoughtfold's loop: the
`TrainerState` the loop keeps current (global_step, epoch, log_history, ...) and the dispatch of each
event to every `TrainerCallback`, whose `TrainerControl` answers (stop, save, log, evaluate) the loop
obeys. Callbacks receive `args` (the run's TrainConfig), `state`, `control` and, as keywords, the
model, the tokenizer (`processing_class`), the optimizer and the schedule, as in transformers."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState

from ..errors import ConfigError

EVENTS = ("on_init_end", "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_step_begin",
          "on_pre_optimizer_step", "on_optimizer_step", "on_step_end", "on_log", "on_evaluate", "on_save")


class Callbacks:
    """The run's callbacks (instances, or classes instantiated here), called in order for each
    event; a hook's returned control replaces the current one, as transformers' handler does."""

    def __init__(self, trainer: Any, callbacks: Iterable[TrainerCallback | type] | None = None):
        self.trainer = trainer
        self.callbacks: list[TrainerCallback] = []
        self.control = TrainerControl()
        for callback in callbacks or ():
            self.add(callback)

    def add(self, callback: TrainerCallback | type) -> None:
        instance = callback() if isinstance(callback, type) else callback
        if not any(callable(getattr(instance, event, None)) for event in EVENTS):
            raise ConfigError(f"callback {type(instance).__name__} has none of TrainerCallback's hooks "
                              "(on_log, on_step_end, ...): subclass transformers.TrainerCallback")
        self.callbacks.append(instance)

    def pop(self, callback: TrainerCallback | type) -> TrainerCallback | None:
        """Remove and return the first callback that is `callback` (or of that class)."""
        for instance in self.callbacks:
            if instance is callback or (isinstance(callback, type) and isinstance(instance, callback)):
                self.callbacks.remove(instance)
                return instance
        return None

    def call(self, event: str, **kwargs: Any) -> TrainerControl:
        """Run `event` on every callback that has it; returns the resulting control."""
        t = self.trainer
        for callback in self.callbacks:
            hook = getattr(callback, event, None)
            if hook is None:
                continue
            result = hook(t.args, t.state, self.control, model=t.policy.model,
                          processing_class=t.policy.tokenizer,
                          optimizer=t.optimizer, lr_scheduler=t.scheduler, **kwargs)
            if result is not None:
                self.control = result
        return self.control


def new_state(trainer: Any, records: list[dict[str, float]]) -> TrainerState:
    """The TrainerState of a run about to start (or resume) at `trainer.step`, its log_history the
    logged `records` up to that step."""
    c = trainer.args
    return TrainerState(global_step=trainer.step, max_steps=c.max_steps, logging_steps=c.logging_steps,
                        eval_steps=c.eval_steps or c.max_steps, save_steps=c.save_steps,
                        train_batch_size=c.prompts_per_step, num_train_epochs=0,
                        epoch=trainer.data_pos / len(trainer.dataset),
                        log_history=[r for r in records if r["step"] <= trainer.step],
                        is_world_process_zero=trainer.dp.main,
                        is_local_process_zero=os.environ.get("LOCAL_RANK", "0") == "0")
