"""Training statistics for any task and any logger: gradient norm, accelerator memory, throughput and MFU, and the
learning rate.

Throughput and MFU come from Lightning's `ThroughputMonitor` (samples/s, items/s = tokens/s for token batches,
FLOP/s, and MFU where the accelerator's peak FLOP/s is known, i.e. on GPUs). FLOPs per batch come from the task's
`training_flops(batch)` (6N + 12LTD per token, Kaplan et al. 2020, for the shapes of each batch: translation batches
vary in length), set as Lightning's `flops_per_batch` before the monitor reads it; a module without that method may
set `flops_per_batch` itself.

The gradient norm is the norm of the whole gradient also when the strategy shards it (Lightning's FSDPStrategy,
ModelParallelStrategy): each rank then holds only its shard's gradients, so every rank computes its shard's sum of
squares, they are summed with one all-reduce, and rank 0 logs the square root. Every rank must enter that
collective, so whether a step is due is decided from the step alone, the same on every rank, not from the rank.
"""

from __future__ import annotations

import resource
import sys
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.callbacks import LearningRateMonitor, ThroughputMonitor
from lightning.pytorch.strategies import FSDPStrategy, Strategy
from torch import Tensor

from polyformer.tasks.base import TaskModule

try:
    from lightning.pytorch.strategies import ModelParallelStrategy
except ImportError:  # older Lightning
    ModelParallelStrategy = None  # type: ignore[assignment,misc]


def batch_size(batch: Any) -> int:
    """Samples in a batch: the leading dimension of its first tensor (tensor, tuple/list or dict batches)."""
    if isinstance(batch, Tensor):
        return int(batch.shape[0])
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else []
    for v in values:
        if isinstance(v, Tensor) and v.ndim > 0:
            return int(v.shape[0])
    return 1


def token_count(batch: Any) -> int:
    """Token positions in a batch: the largest (B, T) integer tensor (an LM block, the longer side of a translation
    pair, CLIP's captions); 0 for batches without token ids (images)."""
    tensors = [batch] if isinstance(batch, Tensor) else list(batch.values() if isinstance(batch, dict) else batch)
    counts = [t.numel() for t in tensors if isinstance(t, Tensor) and t.ndim == 2 and not t.is_floating_point()]
    return max(counts, default=0)


class TrainingStats(ThroughputMonitor):
    """Logs `train/grad_norm` (before clipping), `memory/*` (GB) and Lightning's throughput keys
    (`train|device/samples_per_sec`, `.../items_per_sec`, `.../flops_per_sec`, `.../mfu`) on rank 0.

    Args:
        grad_norm: log the global L2 norm of the gradients every `trainer.log_every_n_steps` optimizer steps.
        memory: log accelerator memory (CUDA: allocated, peak, reserved; CPU: the process's peak RSS).
        window_size: batches averaged by the throughput monitor (it logs once the window is full).
    """

    def __init__(self, grad_norm: bool = True, memory: bool = True, window_size: int = 20) -> None:
        super().__init__(batch_size_fn=batch_size, length_fn=None, window_size=window_size)
        self.grad_norm, self.memory = grad_norm, memory
        self._first_batch_seen = False

    def _step_due(self, trainer: pl.Trainer) -> bool:
        return trainer.global_step % max(1, trainer.log_every_n_steps) == 0  # the same on every rank

    def _due(self, trainer: pl.Trainer) -> bool:
        return trainer.is_global_zero and self._step_due(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, *_: Any) -> None:
        if self._first_batch_seen:
            return
        self._first_batch_seen = True
        tokens = token_count(batch)
        if tokens:  # the throughput monitor then also reports tokens/s as items_per_sec
            self.length_fn = token_count

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # Called before clipping and after unscaling (AMP), so this is the norm the clip threshold is compared with.
        if not self.grad_norm or not self._step_due(trainer):
            return
        sharded, group = gradient_sharding(trainer.strategy)
        if not sharded and not trainer.is_global_zero:
            return  # replicated gradients: rank 0's are everyone's, no collective needed
        norm = global_grad_norm(pl_module, sharded=sharded, group=group, device=trainer.strategy.root_device)
        if norm is not None and trainer.is_global_zero:
            pl_module.log("train/grad_norm", norm, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        set_flops(pl_module, batch, training=True)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.memory and self._due(trainer):
            stats = memory_stats(trainer.strategy.root_device)
            if stats:
                pl_module.log_dict(stats, on_step=True, on_epoch=False, rank_zero_only=True)

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                *args: Any, **kwargs: Any) -> None:  # fmt: skip
        set_flops(pl_module, batch, training=False)
        super().on_validation_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)

    def on_test_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                          *args: Any, **kwargs: Any) -> None:  # fmt: skip
        set_flops(pl_module, batch, training=False)
        super().on_test_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)

    def on_predict_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                             *args: Any, **kwargs: Any) -> None:  # fmt: skip
        set_flops(pl_module, batch, training=False)
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, *args, **kwargs)


def gradient_sharding(strategy: Strategy) -> tuple[bool, dist.ProcessGroup | None]:
    """Whether `strategy` leaves each rank with only a shard of the gradients, and the process group whose shards
    together make one whole gradient (None: the default group, or the one the DTensor gradients carry)."""
    if isinstance(strategy, FSDPStrategy):
        from torch.distributed.fsdp import ShardingStrategy

        if strategy.sharding_strategy == ShardingStrategy.NO_SHARD:
            return False, None  # every rank holds the whole (all-reduced) gradient, as under DDP
        # HYBRID_SHARD shards within a node and replicates across nodes: the root's process_group is the shard group
        # (the whole world for FULL_SHARD / SHARD_GRAD_OP), so replicas are not counted twice.
        return True, getattr(strategy.model, "process_group", None)
    if ModelParallelStrategy is not None and isinstance(strategy, ModelParallelStrategy):
        # Its parameters are DTensors (fully_shard / parallelize_module in configure_model), reduced over their mesh.
        return True, None
    return False, None


def global_grad_norm(
    module: torch.nn.Module,
    sharded: bool,
    group: dist.ProcessGroup | None = None,
    device: torch.device | None = None,
) -> Tensor | None:
    """L2 norm of the gradients of `module`'s parameters; None when there are none (unsharded only).

    `sharded=False`: the local gradients are the whole gradient (single device, DDP). `sharded=True`: a collective
    that every rank of `group` must call, also a rank holding no gradient: the local sums of squares (in float32)
    are all-reduced and the square root taken. Gradients that are DTensors (FSDP2 / tensor parallel) are reduced over
    their own mesh by DTensor, which knows which placements are shards and which replicas.
    """
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    if not sharded:
        return torch.nn.utils.get_total_norm(grads, norm_type=2.0) if grads else None
    from torch.distributed.tensor import DTensor

    if device is None:
        device = grads[0].device if grads else torch.device("cpu")
    squares = torch.zeros((), dtype=torch.float32, device=device)
    shards = [g for g in grads if not isinstance(g, DTensor)]
    if shards:
        norms = torch.stack([torch.linalg.vector_norm(g.detach(), dtype=torch.float32) for g in shards])
        squares = squares + norms.to(device).square().sum()
    dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=group)  # every rank, also one without gradients
    distributed = [g for g in grads if isinstance(g, DTensor)]
    if distributed:
        # The norm of DTensors is a DTensor with a partial placement; `full_tensor` reduces it over the mesh. Every
        # rank holds the same DTensor parameters (ModelParallelStrategy), so all of them get here.
        norm = torch.nn.utils.get_total_norm(distributed, norm_type=2.0)
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squares = squares + norm.to(device=device, dtype=torch.float32).square()
    return squares.sqrt()


def set_flops(pl_module: pl.LightningModule, batch: Any, training: bool) -> None:
    """Lightning's monitor reads one `flops_per_batch` attribute after each batch: refresh it from the task for this
    batch's shapes. Evaluation runs the forward pass only, a third of a training step."""
    if isinstance(pl_module, TaskModule):
        value = pl_module.training_flops(batch)
        # None where a task cannot count its FLOPs: the monitor then logs throughput without FLOP/s, and quietly.
        pl_module.flops_per_batch = None if value is None else value if training else value / 3


def memory_stats(device: torch.device) -> dict[str, float]:
    """Memory of this process on its accelerator, in GB."""
    gb = 1024**3
    if device.type == "cuda":
        return {
            "memory/allocated_gb": torch.cuda.memory_allocated(device) / gb,
            "memory/peak_allocated_gb": torch.cuda.max_memory_allocated(device) / gb,
            "memory/reserved_gb": torch.cuda.memory_reserved(device) / gb,
        }
    if device.type == "mps":
        return {"memory/allocated_gb": torch.mps.current_allocated_memory() / gb}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kilobytes on Linux, bytes on macOS
    return {"memory/peak_rss_gb": peak * (1 if sys.platform == "darwin" else 1024) / gb}


class LearningRate(LearningRateMonitor):
    """Lightning's `LearningRateMonitor` (`lr-<Optimizer>[/pg<i>]` every logged step) that stays quiet instead of
    raising when a run has no logger, so it can be registered for every run."""

    def __init__(self, logging_interval: str | None = "step", log_momentum: bool = False) -> None:
        super().__init__(logging_interval=logging_interval, log_momentum=log_momentum)  # type: ignore[arg-type]
        self._off = False

    def on_train_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        self._off = not trainer.loggers
        if not self._off:
            super().on_train_start(trainer, *args, **kwargs)

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self._off:
            super().on_train_batch_start(trainer, *args, **kwargs)

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any, **kwargs: Any) -> None:
        if not self._off:
            super().on_train_epoch_start(trainer, *args, **kwargs)
