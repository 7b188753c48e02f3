"""What a training run keeps in its output directory, as a part of the trainers' loop (loop.py):
the refusal to mix a new run into an old one, checkpoints written and restored atomically, and
resuming (from the newest intact checkpoint, or one given) with the run's own settings."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from ..errors import ConfigError, CorruptFileError
from .checkpoint import (
    check_optimizer_state,
    checkpoint_name,
    list_checkpoints,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_aside,
    set_rng_state,
)
from .metrics import METRICS_NAME, read_metrics
from .resume import check_run_settings

log = logging.getLogger("thoughtfold")

CHECKPOINTS_DIR = "checkpoints"


class RunDirectory:
    """The trainer's output directory side (a base of loop.Trainer, which holds the attributes used
    here: config, dp, output_dir, policy, optimizer, scheduler, step, data_pos)."""

    def _check_output_dir(self) -> None:
        """Never mix a new run into an old one (checked before the model loads): a resume must keep
        the run's settings; a fresh run over a run that checkpointed or logged steps is refused, or
        with `overwrite_output_dir` the old checkpoints go so that a later resume cannot pick them up."""
        c, checkpoints = self.config, self.output_dir / CHECKPOINTS_DIR
        if c.resume:
            check_run_settings(c, self.output_dir)
            return
        if not list_checkpoints(checkpoints) and not read_metrics(self.output_dir / METRICS_NAME):
            return
        if not c.overwrite_output_dir:  # raised by train() unless it resumes
            self._refusal = ConfigError(
                f"{self.output_dir} already holds a run: set resume=true (or call "
                "train(resume_from_checkpoint=True)) to continue that run, overwrite_output_dir=true to "
                "start over, or pick another output_dir")
            return
        self.dp.barrier()  # every process has looked before the main one deletes
        if self.dp.main:
            log.info("overwrite_output_dir: removing the old checkpoints in %s", checkpoints)
            shutil.rmtree(checkpoints, ignore_errors=True)

    def _resume(self) -> None:
        """Continue from the newest intact checkpoint. A damaged one (a disk that filled up, a
        truncated copy) is renamed aside with a warning, so that pruning and later resumes skip it,
        and the one before is tried; one that does not fit the run's settings is refused and left as
        it is. Without any checkpoint the run starts from step 0, with a warning when steps were
        logged (they are dropped), and never when damaged checkpoints are all there is."""
        checkpoints = self.output_dir / CHECKPOINTS_DIR
        found = list_checkpoints(checkpoints)
        if not found:
            damaged = sorted(checkpoints.glob("step-*.corrupt*")) if checkpoints.is_dir() else []
            if damaged:
                raise ConfigError(f"{checkpoints} holds only damaged checkpoints ({damaged[-1].name}): "
                                  "restore them from a copy, or start over with overwrite_output_dir=true")
            logged = len(read_metrics(self.output_dir / METRICS_NAME))
            dropped = f" (the {logged} steps logged before are dropped)" if logged else ""
            level = logging.WARNING if logged else logging.INFO
            log.log(level, "no checkpoint in %s: starting from step 0%s", checkpoints, dropped)
            return
        for path in reversed(found):
            try:
                self._restore(path)
            except CorruptFileError as e:
                log.warning("checkpoint %s is damaged, trying the one before: %s", path.name, e)
                if self.dp.main:
                    set_aside(path)
                continue
            except ConfigError as e:
                raise ConfigError(f"checkpoint {path} does not fit this run's settings ({e}); resume with "
                                  "the settings it was saved with, or start a new run in another output_dir"
                                  ) from None
            log.info("resumed from %s (step %d)", path, self.step)
            return
        raise ConfigError(f"none of the {len(found)} checkpoints in {checkpoints} is intact (see the "
                          "warnings); start over with overwrite_output_dir=true or restore them from a copy")

    def save_checkpoint(self) -> Path:
        """Adapter + optimizer + schedule + RNG + data position, atomically (by the main process;
        the others wait, so no process runs ahead of the last complete checkpoint)."""
        path = self.output_dir / CHECKPOINTS_DIR / checkpoint_name(self.step)
        if self.dp.main:
            self._write_checkpoint()
        self.dp.barrier()
        self._saved_step = self.step
        return path

    def _write_checkpoint(self) -> None:
        state = {
            "step": self.step,
            "data_pos": self.data_pos,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(),
        }
        save_checkpoint(self.output_dir / CHECKPOINTS_DIR, self.step, self.policy, state,
                        keep=self.config.save_total_limit)

    def _restore(self, path: Path) -> None:
        state = load_checkpoint(path, self.policy)
        check_optimizer_state(state["optimizer"], self.optimizer, path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            set_rng_state(state["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CorruptFileError(f"{path}: its trainer state cannot be restored ({type(e).__name__})") \
                from None
        self.step, self.data_pos = state["step"], state["data_pos"]
        self._saved_step = self.step

    def _resume_from(self, checkpoint: bool | str | os.PathLike) -> None:
        """train(resume_from_checkpoint=...): the checks of resume=true first (the run in output_dir,
        and the run a given checkpoint belongs to, must have been started with these settings), then
        the newest intact checkpoint (True) or the one given."""
        runs = [self.output_dir]
        if checkpoint is not True and Path(checkpoint).resolve().parent.name == CHECKPOINTS_DIR:
            runs.append(Path(checkpoint).resolve().parent.parent)
        for run in runs:
            check_run_settings(self.config, run)
        if checkpoint is True:
            self._resume()
        else:
            self._restore(Path(checkpoint))
            log.info("resumed from %s (step %d)", checkpoint, self.step)
