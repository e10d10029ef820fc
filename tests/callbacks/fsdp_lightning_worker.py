"""Run by `torchrun --nproc_per_node 2` (gloo, CPU): Lightning's FSDP strategy (polyformer's subclasses, which run on
CPU) on a tiny model.

`gradnorm OUT`: two steps with `TrainingStats`; rank 0 writes the `train/grad_norm` it logged next to the norm of
the full, unsharded gradient (FSDP's `summon_full_params(with_grads=True)`, a collective on every rank).
`crash OUT`: two steps under polyformer.strategies.FSDPStrategy (sharded checkpoints), save `OUT/last.ckpt`, write the
full weights to `OUT/expected.pt`, change the weights, save again: rank 1 dies while writing its shard into the
directory it was given (a SIGKILL mid-write, as far as the files on disk are concerned).
`resume OUT`: fresh processes resume from `OUT/last.ckpt` through Lightning's loading, rank 0 writes whether the
weights and step are the saved ones to `OUT/resumed.json`, train a step and save `last.ckpt` again.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from polyformer.callbacks.stats import TrainingStats
from polyformer.strategies import FSDPStrategy


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
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy=FSDPStrategy(), max_steps=2, log_every_n_steps=1,
                        callbacks=[TrainingStats(memory=False), full], logger=recorder, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    trainer.fit(Tiny(), data())
    if trainer.is_global_zero:
        logged = [m["train/grad_norm"] for _, m in recorder.metrics if "train/grad_norm" in m]
        (out / "gradnorm.json").write_text(json.dumps({"logged": logged, "full": full.norms}))


def full_weights(trainer: L.Trainer) -> dict[str, torch.Tensor]:
    """The unsharded weights (a collective: every rank calls it), on rank 0; an empty dict elsewhere."""
    from torch.distributed.fsdp import FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = trainer.strategy.model
    with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, FullStateDictConfig(rank0_only=True)):
        state = model.state_dict()
    return {k: v.clone() for k, v in state.items()}


def sharded_trainer(max_steps: int, callbacks: list[L.Callback] | None = None) -> L.Trainer:
    strategy = FSDPStrategy(state_dict_type="sharded")
    return L.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_steps=max_steps, logger=False,
                     callbacks=callbacks or [], enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False)  # fmt: skip


def crash(out: Path) -> None:
    import lightning.pytorch.strategies.fsdp as lightning_fsdp

    L.seed_everything(0)
    trainer = sharded_trainer(max_steps=2)
    trainer.fit(Tiny(), data())
    trainer.save_checkpoint(out / "last.ckpt")
    expected = full_weights(trainer)
    if trainer.is_global_zero:
        torch.save({"global_step": trainer.global_step, "weights": expected}, out / "expected.pt")
    with torch.no_grad():
        for p in trainer.strategy.model.parameters():
            p.add_(1.0)  # the next save holds other weights

    real_save = lightning_fsdp._distributed_checkpoint_save

    def dying_save(state: dict[str, Any], path: Path) -> None:
        if trainer.global_rank == 1:
            with open(Path(path) / "__1_0.distcp", "wb") as f:  # this rank's shard file, truncated and half-written
                f.write(b"half a shard")
                f.flush()
            os._exit(17)
        real_save(state, path)  # rank 0 writes, then waits for rank 1 until torchrun ends it

    lightning_fsdp._distributed_checkpoint_save = dying_save
    trainer.save_checkpoint(out / "last.ckpt")


class CheckResumed(L.Callback):
    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights = full_weights(trainer)
        if trainer.is_global_zero:
            expected = torch.load(self.out / "expected.pt", weights_only=True)
            diff = max((weights[k] - v).abs().max().item() for k, v in expected["weights"].items())
            same_keys = sorted(weights) == sorted(expected["weights"])
            result = {"global_step": trainer.global_step, "expected_step": expected["global_step"],
                      "max_abs_diff": diff, "same_keys": same_keys}  # fmt: skip
            (self.out / "resumed.json").write_text(json.dumps(result))


def resume(out: Path) -> None:
    L.seed_everything(1)
    trainer = sharded_trainer(max_steps=3, callbacks=[CheckResumed(out)])
    trainer.fit(Tiny(), data(), ckpt_path=out / "last.ckpt")
    trainer.save_checkpoint(out / "last.ckpt")


if __name__ == "__main__":
    {"gradnorm": gradnorm, "crash": crash, "resume": resume}[sys.argv[1]](Path(sys.argv[2]))
