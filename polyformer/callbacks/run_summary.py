"""Says where a run's results are when fit ends: the best and last checkpoints, the logs, and the best score."""

from __future__ import annotations

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class RunSummary(L.Callback):
    """Prints, on rank 0 only, the paths a user looks for after training (so nobody has to dig in the log dirs)."""

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        lines = []
        for cb in trainer.checkpoint_callbacks:
            if not isinstance(cb, ModelCheckpoint):
                continue
            if cb.best_model_path:
                score = "" if cb.best_model_score is None else f" ({cb.monitor} = {float(cb.best_model_score):.4f})"
                lines.append(f"best checkpoint: {cb.best_model_path}{score}")
            if cb.last_model_path and cb.last_model_path != cb.best_model_path:
                lines.append(f"last checkpoint: {cb.last_model_path}")
        for logger in trainer.loggers:
            where = getattr(logger, "log_dir", None) or logger.save_dir
            lines.append(f"logs ({type(logger).__name__.removesuffix('Logger')}): {where}")
        if not lines:
            lines.append("no checkpoints or logs were written (checkpointing and logging are switched off)")
        print("\n".join(["", "Run summary:", *(f"  {line}" for line in lines)]), flush=True)
