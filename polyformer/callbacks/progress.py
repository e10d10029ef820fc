"""The progress bar: one bar over the whole fit in optimizer steps, with throughput (tokens/s or images/s), the ETA of
the run and the metrics the task shows (`self.log(..., prog_bar=True)`).

Lightning's bars count batches per epoch: a run set by `max_steps` over a corpus of a few hundred batches shows
"Epoch 0/-2" and an ETA for the epoch, not the run. Here the total is the run's optimizer steps
(`trainer.estimated_stepping_batches`) and throughput is counted from the batches themselves, on every device
(`x world_size`: each rank gets a batch of the same shape). Written with rich directly, since only the columns
differ from Lightning's RichProgressBar and its internals are private.

In a terminal the bar redraws in place (validation and evaluation get a transient bar of their own). Elsewhere
(a SLURM log, CI, a pipe) a redrawn bar is noise: one plain line is printed about every 5% of the run instead.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks.progress.progress_bar import ProgressBar
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from torch import Tensor

from polyformer.callbacks.stats import batch_size, token_count


def work_units(batch: Any) -> tuple[int, str]:
    """(count, unit) of one batch: tokens for token batches, else images (4-D float tensors) or samples."""
    tokens = token_count(batch)
    if tokens:
        return tokens, "tok"
    tensors = [batch] if isinstance(batch, Tensor) else list(batch.values() if isinstance(batch, dict) else batch)
    images = any(isinstance(t, Tensor) and t.is_floating_point() and t.ndim == 4 for t in tensors)
    return batch_size(batch), "img" if images else "samples"


def rate(value: float) -> str:
    return f"{value / 1e6:.2f}M" if value >= 1e6 else f"{value / 1e3:.1f}k" if value >= 1e3 else f"{value:.1f}"


def metric_text(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        if key == "v_num":
            continue
        v = float(value)
        parts.append(f"{key} {v:.4g}" if math.isfinite(v) else f"{key} {v}")
    return " · ".join(parts)


class StepProgressBar(ProgressBar):
    """Args:
    plain_lines: lines printed over a whole fit when the output is not a terminal (about one per 1/plain_lines of
        the steps, and never more often than every `trainer.log_every_n_steps`).
    """

    def __init__(self, plain_lines: int = 20) -> None:
        super().__init__()
        self.plain_lines = plain_lines
        self._enabled = True
        self._console: Console | None = None
        self._progress: Progress | None = None
        self._fit_task: TaskID | None = None
        self._eval_task: TaskID | None = None
        self._total: float = 0
        self._units, self._unit = 0, "tok"
        self._window_start = 0.0
        self._rate = 0.0
        self._last_plain_step = -1
        self._fit_started, self._start_step = 0.0, 0

    # Lightning's ProgressBar contract
    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def print(self, *args: Any, **kwargs: Any) -> None:
        if self._progress is not None:
            self._progress.console.print(*args, **kwargs)
        else:
            print(*args, **kwargs)

    @property
    def interactive(self) -> bool:
        return sys.stdout.isatty()

    def _make_console(self) -> Console:
        return Console(file=sys.stdout)

    def _start(self) -> Progress:
        if self._progress is None:
            self._console = self._make_console()
            self._progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[info]}"),
                console=self._console,
                auto_refresh=True,
                refresh_per_second=4,
            )
            self._progress.start()
        return self._progress

    def _stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
        self._progress, self._fit_task, self._eval_task = None, None, None

    # fit
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.is_enabled:
            return
        steps = trainer.estimated_stepping_batches
        self._total = steps if math.isfinite(steps) else 0
        self._window_start, self._units, self._rate = time.perf_counter(), 0, 0.0
        self._fit_started, self._start_step = self._window_start, trainer.global_step  # a resumed run starts later
        if self.interactive:
            self._fit_task = self._start().add_task(
                "fit", total=self._total or None, info="", completed=trainer.global_step
            )

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self.is_enabled:
            return
        n, self._unit = work_units(batch)
        self._units += n * trainer.world_size
        now = time.perf_counter()
        elapsed = now - self._window_start
        if elapsed > 0 and (elapsed >= 1.0 or not self._rate):  # >= 1 s once a rate exists: batch rates jitter
            self._rate = self._units / elapsed
        if elapsed >= 10.0:  # a window of ~10 s follows changes (validation, other jobs) without jitter
            self._units, self._window_start = 0, now
        step = trainer.global_step
        info = " · ".join(
            p
            for p in (f"{rate(self._rate)} {self._unit}/s" if self._rate else "", self._metrics(trainer, pl_module))
            if p
        )
        if self._fit_task is not None and self._progress is not None:
            self._progress.update(self._fit_task, completed=step, info=info)
        elif not self.interactive and step != self._last_plain_step and self._plain_due(trainer, step):
            self._last_plain_step = step
            total = f"/{int(self._total):,}" if self._total else ""
            eta = self._eta(step)
            print(
                f"step {step:,}{total}" + (f" · eta {eta}" if eta else "") + (f" · {info}" if info else ""), flush=True
            )

    def _plain_due(self, trainer: pl.Trainer, step: int) -> bool:
        every = max(trainer.log_every_n_steps, int(self._total // self.plain_lines) if self._total else 50, 1)
        return step % every == 0 or (bool(self._total) and step >= self._total)

    def _eta(self, step: int) -> str:
        done = step - self._start_step
        if not self._total or done <= 0:
            return ""
        elapsed = time.perf_counter() - self._fit_started
        left = elapsed / done * max(0.0, self._total - step)
        return time.strftime("%H:%M:%S", time.gmtime(left))

    def _metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        return metric_text(self.get_metrics(trainer, pl_module))

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._progress is not None and self._fit_task is not None:
            self._progress.update(self._fit_task, completed=trainer.global_step)
        self._stop()

    # validation inside fit, and validate / test / predict
    def _eval_start(self, trainer: pl.Trainer, description: str, total: float) -> None:
        if not self.is_enabled or not self.interactive or trainer.sanity_checking:
            return
        total_known = total if math.isfinite(total) else None
        self._eval_task = self._start().add_task(description, total=total_known, info="")

    def _eval_advance(self) -> None:
        if self._progress is not None and self._eval_task is not None:
            self._progress.advance(self._eval_task)

    def _eval_end(self) -> None:
        if self._progress is not None and self._eval_task is not None:
            self._progress.remove_task(self._eval_task)
            self._eval_task = None
            if self._fit_task is None:
                self._stop()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, "validate", self.total_val_batches)

    def on_validation_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._eval_advance()

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end()
        self._window_start, self._units = time.perf_counter(), 0  # throughput of training alone
        if self._fit_task is not None and self._progress is not None:  # show the new val metrics at once
            self._progress.update(self._fit_task, info=self._metrics(trainer, pl_module))
        elif self.is_enabled and not self.interactive and trainer.state.fn == "fit" and not trainer.sanity_checking:
            # A log file gets the validation's metrics as a line of their own: the last step's line came before them.
            metrics = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if not k.startswith("train/")}
            print(f"validation at step {trainer.global_step:,} · {metric_text(metrics)}", flush=True)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, "test", sum(trainer.num_test_batches))

    def on_test_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._eval_advance()

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_start(trainer, "predict", sum(trainer.num_predict_batches))

    def on_predict_batch_end(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._eval_advance()

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._eval_end()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._stop()  # leave the terminal clean for the error message

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop()
