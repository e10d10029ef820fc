"""`ResumableCheckpoint`: Lightning's `ModelCheckpoint` whose `last.ckpt` is the latest state again (a name of its
own, so `--trainer.callbacks+=ModelCheckpoint` stays unambiguous).

Since Lightning 2.6, `save_last=True` writes `last.ckpt` only at steps where a top-k checkpoint is written too. With a
monitored metric that stops improving (accuracy at 100%, a loss that plateaus) `last.ckpt` stays at the best step,
so `fit --ckpt_path last.ckpt` silently resumes from the past and "last" weights are really the best ones. This
subclass writes `last.ckpt` at every point Lightning considers saving (after validation, at epoch end or every N
steps, as configured) and when training ends, once per step, and always as a real file (a `save_last: link` to an
older best would be stale).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import Tensor


class ResumableCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` (same arguments) with `save_last` meaning "the state at the latest save point"."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._last_written_step = -1

    def _save_topk_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        super()._save_topk_checkpoint(trainer, monitor_candidates)
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._write_last(trainer, monitor_candidates)  # no top-k file at this step: Lightning would skip it

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_end(trainer, pl_module)
        # Training may stop between save points (max_epochs not a multiple of check_val_every_n_epoch, max_steps or
        # a requeue mid-epoch); the final weights are the ones people test, serve and resume from.
        if self.save_last and not trainer.fast_dev_run and self._last_written_step != trainer.global_step:
            self._write_last(trainer, self._monitor_candidates(trainer))

    def _write_last(self, trainer: pl.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        # `_last_checkpoint_saved` names an older best file, which `save_last: link` would point last.ckpt at;
        # clearing it makes this a real save of the current state.
        self._last_checkpoint_saved = ""
        self._save_last_checkpoint(trainer, monitor_candidates)

    def _save_last_checkpoint(self, trainer: pl.Trainer, monitor_candidates: dict[str, Tensor]) -> None:
        if self._last_written_step == trainer.global_step and self.last_model_path:
            return  # written a moment ago by the override above; Lightning asks again after its top-k save
        super()._save_last_checkpoint(trainer, monitor_candidates)
        self._last_written_step = trainer.global_step
