"""Training guards, on for every run from the CLI (`--guards.*`).

Non-finite loss: a NaN/Inf loss (or gradient) is caught after backward and before the optimizer step, so the
weights and optimizer state are never updated with it. `on_nonfinite="stop"` (default) ends the run with a message
naming the step; no checkpoint is written after the bad step, so the last good one stays as it was. "skip" drops the
update (gradients set to None, so AdamW leaves the weights and its moments alone) and carries on, until
`max_consecutive_skips` bad steps in a row show that the run has diverged rather than met one bad batch.

The decision is reduced across ranks (one scalar all-reduce per optimizer step), so under DDP every rank stops or
skips together instead of one rank waiting forever in the next collective.

Out of memory: the exception gets a note naming the knobs that trade memory for time, with their current values.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from polyformer.tasks.base import TaskModule


class NonFiniteLossError(RuntimeError):
    pass


def is_out_of_memory(exception: BaseException) -> bool:
    if isinstance(exception, torch.OutOfMemoryError):
        return True
    # CPU allocations fail with a plain RuntimeError ("DefaultCPUAllocator: can't allocate memory"), MPS likewise.
    text = str(exception)
    return isinstance(exception, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def out_of_memory_hint(trainer: L.Trainer | None) -> str:
    """The memory knobs with their current values, e.g. for a note on an OutOfMemoryError."""
    if trainer is None:
        return (
            "out of memory: lower data.batch_size (raise trainer.accumulate_grad_batches to keep the effective "
            "batch) or use trainer.precision=bf16-mixed"
        )
    batch = getattr(trainer.datamodule, "batch_size", None)
    accumulate = trainer.accumulate_grad_batches
    precision = str(trainer.precision)
    task = trainer.lightning_module
    checkpointing = task.activation_checkpointing if isinstance(task, TaskModule) else None
    knobs = [
        f"lower data.batch_size (now {batch}"
        + (f", e.g. {batch // 2})" if batch and batch > 1 else ")")
        + f" and raise trainer.accumulate_grad_batches (now {accumulate}, e.g. {accumulate * 2}) to keep the "
        "effective batch"
    ]
    if precision in ("32-true", "32", "64-true", "64"):
        knobs.append(f"use trainer.precision=bf16-mixed (now {precision})")
    if checkpointing is False:
        knobs.append("set model.activation_checkpointing=true (recomputes activations in backward)")
    return "out of memory: " + "; or ".join(knobs)


class TrainingGuards(L.Callback):
    """Stops (or skips) non-finite steps and explains out-of-memory errors."""

    def __init__(
        self,
        on_nonfinite: Literal["stop", "skip", "off"] = "stop",  # what a NaN/Inf loss or gradient does
        max_consecutive_skips: int = 10,  # "skip": this many bad steps in a row stop the run anyway
    ) -> None:
        if max_consecutive_skips < 1:
            raise ValueError(f"guards.max_consecutive_skips must be >= 1, got {max_consecutive_skips}")
        self.on_nonfinite = on_nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.skipped = 0
        self._consecutive = 0
        self._batch_idx = 0
        self._loss_finite: torch.Tensor | None = None  # AND over the micro-batches of this optimizer step
        self._loss_value = torch.zeros(())
        self._locally_finite = True  # this rank's own verdict, for the message when another rank was the bad one

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.skipped = self._consecutive = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._batch_idx = batch_idx

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        if self.on_nonfinite == "off":
            return
        # Kept as tensors: reading them here would synchronise the GPU once per micro-batch instead of once per step.
        value = loss.detach().float().sum()  # NaN and Inf survive the sum
        finite = torch.isfinite(value)
        if self._loss_finite is None:
            self._loss_finite, self._loss_value = finite, value
        else:  # gradient accumulation: remember the first bad micro-batch's loss for the message
            self._loss_value = torch.where(self._loss_finite, value, self._loss_value)
            self._loss_finite = self._loss_finite & finite

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.on_nonfinite == "off":
            return
        loss_finite, self._loss_finite = self._loss_finite, None
        ok = torch.ones((), dtype=torch.bool, device=pl_module.device) if loss_finite is None else loss_finite
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        # fp16 with a GradScaler: overflowing gradients are routine and the scaler already skips those steps.
        if grads and getattr(trainer.precision_plugin, "scaler", None) is None:
            ok = ok & torch.isfinite(torch.nn.utils.get_total_norm(grads)).to(ok.device)
        self._locally_finite = bool(ok)
        bad = trainer.strategy.reduce_boolean_decision(not self._locally_finite, all=False)  # any rank: all act
        if not bad:
            self._consecutive = 0
            return
        what = self._describe(trainer, loss_finite)
        if self.on_nonfinite == "skip" and self._consecutive + 1 < self.max_consecutive_skips:
            self._consecutive += 1
            self.skipped += 1
            optimizer.zero_grad(set_to_none=True)  # no update: AdamW skips parameters without gradients
            rank_zero_warn(f"{what}: skipped this step ({self.skipped} skipped so far)")
            return
        if self.on_nonfinite == "skip":
            raise NonFiniteLossError(
                f"{what}, {self.max_consecutive_skips} non-finite steps in a row (guards.max_consecutive_skips): "
                f"the run has diverged. "
                f"{self._advice(trainer, skip=False)}"
            )
        raise NonFiniteLossError(f"{what}. {self._advice(trainer, skip=True)}")

    def _describe(self, trainer: L.Trainer, loss_finite: torch.Tensor | None) -> str:
        where = f"step {trainer.global_step} (epoch {trainer.current_epoch}, batch {self._batch_idx})"
        if loss_finite is not None and not bool(loss_finite):
            return f"the training loss is {self._loss_value.item()} at {where}"
        if self._locally_finite:
            return f"the loss or gradients on another rank are not finite at {where}"
        return f"the gradients are not finite (inf or nan) at {where}"

    @staticmethod
    def _advice(trainer: L.Trainer, skip: bool) -> str:
        paths = [p for cb in trainer.checkpoint_callbacks for p in (getattr(cb, "last_model_path", ""),) if p]
        paths = paths or [getattr(cb, "best_model_path", "") for cb in trainer.checkpoint_callbacks]
        kept = [p for p in paths if p]
        saved = f"The last checkpoint ({kept[0]}) was not touched. " if kept else "No checkpoint was written after it. "
        fixes = "Lower model.optimizer.lr, set trainer.gradient_clip_val, or use trainer.precision=bf16-mixed/32-true"
        return saved + fixes + (", or pass --guards.on_nonfinite=skip to skip such steps." if skip else ".")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if is_out_of_memory(exception) and not hasattr(exception, "polyformer_hint"):
            hint = out_of_memory_hint(trainer)
            exception.polyformer_hint = hint  # type: ignore[attr-defined]  # read by polyformer.cli
            if hasattr(exception, "add_note"):  # Python >= 3.11: also shown in a traceback outside the CLI
                exception.add_note(hint)
