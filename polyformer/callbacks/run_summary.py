"""What a run says in the terminal at its start and end: the task, its size, the work per step and where it writes;
then where its checkpoints and logs are and the best score.

It replaces Lightning's model summary table, which counts a tied embedding and head twice (a 1.8 M + 0.4 M model
shows as 2.2 M) and prints a FLOPs column of zeros for models it does not trace.
"""

from __future__ import annotations

import os
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from polyformer.backbone.embeddings import TokenEmbedding
from polyformer.backbone.positional import LearnedPositions
from polyformer.callbacks.run_directory import LATEST, RunDirectory
from polyformer.callbacks.stats import batch_size, gradient_sharding, token_count
from polyformer.tasks.base import TaskModule


def parameter_counts(module: nn.Module, strategy: Any) -> tuple[int, int, int]:
    """(parameters, those in embedding tables (token and learned positions), those that serve twice (a tied head)),
    each shared tensor counted once. Under a sharding strategy every rank holds a part: the parts are summed over the
    shard group (every rank must call this then); DTensor parameters know their global size."""
    params = list(module.parameters())  # deduplicated by identity: tied weights appear once
    uses = [p for _, p in module.named_parameters(remove_duplicate=False)]
    tables = (nn.Embedding, TokenEmbedding, LearnedPositions)
    in_tables = {id(m.weight) for m in module.modules() if isinstance(m, tables)}
    counts = torch.tensor(
        [
            sum(p.numel() for p in params),
            sum(p.numel() for p in params if id(p) in in_tables),
            sum(p.numel() for p in uses) - sum(p.numel() for p in params),
        ],
        dtype=torch.float64,
    )
    sharded, group = gradient_sharding(strategy)
    is_dtensor = any(type(p).__name__ == "DTensor" for p in params)
    if sharded and not is_dtensor and dist.is_available() and dist.is_initialized():
        counts = counts.to(strategy.root_device)
        dist.all_reduce(counts, group=group)
    return int(counts[0]), int(counts[1]), int(counts[2])


def millions(n: float) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def work_per_step(batch: Any, trainer: L.Trainer) -> str:
    """'4,096 tokens (32 x 128 per device, x 2 devices, x 4 accumulated)' for one optimizer step."""
    images = [t for t in _tensors(batch) if t.is_floating_point() and t.ndim == 4]
    tokens = token_count(batch)
    n, unit = (tokens, "tokens") if tokens and not images else (batch_size(batch), "images" if images else "samples")
    factors = [f"x {trainer.world_size} devices"] * (trainer.world_size > 1)
    factors += [f"x {trainer.accumulate_grad_batches} accumulated"] * (trainer.accumulate_grad_batches > 1)
    total = n * trainer.world_size * trainer.accumulate_grad_batches
    shape = next((t.shape for t in _tensors(batch) if t.ndim == 2 and not t.is_floating_point()), None)
    per_device = " x ".join(map(str, shape)) if unit == "tokens" and shape is not None else f"{n}"
    if unit == "tokens" and images:
        unit = "samples"
    detail = ", ".join([f"{per_device} per device", *factors])
    variable = unit == "tokens" and isinstance(batch, dict) and "source" in batch  # translation: lengths vary by batch
    return f"{'~' if variable else ''}{total:,} {unit} ({detail})"


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return [batch]
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    return [v for v in values if isinstance(v, torch.Tensor)]


def _relative(path: str | os.PathLike) -> str:
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else os.fspath(path)


class RunSummary(L.Callback):
    """On global rank 0: a short header when fit starts (printed before the first training step) and, when fit ends,
    the paths a user looks for (best and last checkpoints, logs) so nobody has to dig in the log directories."""

    def __init__(self) -> None:
        self._counts: tuple[int, int, int] | None = None
        self._header_due = False

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        model = pl_module.model if isinstance(pl_module, TaskModule) and pl_module.model is not None else pl_module
        self._counts = parameter_counts(model, trainer.strategy)  # on every rank: a collective under sharding
        self._header_due = trainer.is_global_zero

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._header_due:
            return
        self._header_due = False
        print(self.header(trainer, pl_module, batch), flush=True)

    def header(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any) -> str:
        model = pl_module.model if isinstance(pl_module, TaskModule) else None
        name = type(pl_module).__name__ + (f" ({type(model).__name__})" if model is not None else "")
        total, embedding, shared = self._counts or (0, 0, 0)
        parts = [f"{millions(embedding)} in embeddings"] * bool(embedding)
        parts += [f"{millions(shared)} shared (tied), counted once"] * bool(shared)
        size = f"{millions(total)} parameters" + (f" ({', '.join(parts)})" if parts else "")
        steps = f"{trainer.max_steps:,} steps" if trainer.max_steps > 0 else f"{trainer.max_epochs} epochs"
        accelerator = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
        device = f"{trainer.num_devices * trainer.num_nodes} x {accelerator}"
        lines = [
            f"{name}: {size}",
            f"  per step: {work_per_step(batch, trainer)}",
            f"  {steps}, precision {trainer.precision}, {device}, {type(trainer.strategy).__name__}",
        ]
        run_dir = next((cb.run_dir for cb in trainer.callbacks if isinstance(cb, RunDirectory)), None)  # type: ignore[attr-defined]
        if run_dir is not None:
            latest = run_dir.parent / LATEST
            link = (
                f" ({_relative(latest)} points here)"
                if latest.is_symlink() and latest.resolve() == run_dir.resolve()
                else ""
            )
            lines.append(f"  run directory: {_relative(run_dir)}{link}")
        return "\n".join(["", *lines, ""])

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
