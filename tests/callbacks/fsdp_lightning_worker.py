"""Run by `torchrun --nproc_per_node 2` (gloo, CPU): Lightning's FSDP strategy (the CPU test variant) on a tiny
model.

`gradnorm OUT`: two steps with `TrainingStats`; rank 0 writes the `train/grad_norm` it logged next to the norm of
the full, unsharded gradient (FSDP's `summon_full_params(with_grads=True)`, a collective on every rank).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from cpu_fsdp import CPUFSDPStrategy
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from polyformer.callbacks.stats import TrainingStats


class Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        # Odd sizes: the flat shards split the parameters unevenly.
        self.net = nn.Sequential(nn.Linear(7, 13), nn.GELU(), nn.Linear(13, 5), nn.GELU(), nn.Linear(5, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=0.01)


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 7, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1, keepdim=True).sin()), batch_size=4)


class Recorder(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((int(step or 0), dict(metrics)))


class FullGradNorm(L.Callback):
    """The norm of the unsharded gradient, before each optimizer step (after TrainingStats measured it)."""

    def __init__(self) -> None:
        self.norms: list[float] = []

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        model = trainer.strategy.model
        with FSDP.summon_full_params(model, with_grads=True, writeback=False):
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            self.norms.append(float(torch.nn.utils.get_total_norm(grads)))


def gradnorm(out: Path) -> None:
    L.seed_everything(0)
    recorder, full = Recorder(), FullGradNorm()
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=CPUFSDPStrategy(), max_steps=2, log_every_n_steps=1,
                        callbacks=[TrainingStats(memory=False), full], logger=recorder, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Tiny(), data())
    if trainer.is_global_zero:
        logged = [m["train/grad_norm"] for _, m in recorder.metrics if "train/grad_norm" in m]
        (out / "gradnorm.json").write_text(json.dumps({"logged": logged, "full": full.norms}))


if __name__ == "__main__":
    {"gradnorm": gradnorm}[sys.argv[1]](Path(sys.argv[2]))
