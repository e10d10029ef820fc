"""One place for everything a run writes: `<trainer.default_root_dir>/version_N`, for every task, preset and logger.

    runs/lm-tiny/
      latest -> version_1       the newest fit (a symlink, replaced atomically)
      version_0/ version_1/     one directory per run:
        config.yaml             the resolved config (LightningCLI)
        checkpoints/            last.ckpt, the best ones
        events.out.tfevents.*   TensorBoard, or metrics.csv + hparams.yaml (CSV), or wandb/ (W&B, offline or not)

Lightning alone spreads these out: TensorBoard and CSV logs under `<save_dir>/lightning_logs/version_N`, W&B files
under its `save_dir` whatever `default_root_dir` says, and checkpoints under `<save_dir>/<project>/<run id>` for W&B.
Here the directory is decided once, when the Trainer sets up, on every rank together: the first logger's own
directory when it is TensorBoard or CSV (Lightning numbers it and broadcasts it), else the next free `version_N`
that global rank 0 creates and broadcasts. Then the polyformer loggers that were left without a `save_dir`, and the
checkpoint callbacks without a `dirpath`, are pointed into it. An explicit `save_dir` or `dirpath` is kept.

Runs under SLURM requeue or a `--ckpt_path` resume start a new `version_N` (as Lightning's loggers do); a W&B run
still continues its run (`polyformer.loggers.RunMetadata`).
"""

from __future__ import annotations

import os
from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger as LightningCSVLogger
from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger

from polyformer.loggers import CSV, TensorBoard, WandbLogger

LATEST = "latest"


def next_run_dir(root: str | Path) -> Path:
    """Create and return `root/version_N` with N one above the highest existing (a concurrent run that takes the same
    N first makes this one move on to the next)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name[8:]) for p in root.glob("version_*") if p.name[8:].isdigit()]
    n = max(taken, default=-1) + 1
    while True:
        try:
            (root / f"version_{n}").mkdir()
            return root / f"version_{n}"
        except FileExistsError:
            n += 1


def point_latest(run_dir: Path) -> None:
    """`run_dir.parent/latest` -> run_dir (relative, so a moved or copied tree still works), swapped in atomically."""
    link = run_dir.parent / LATEST
    if link.exists() and not link.is_symlink():
        return  # a file or folder of the user's named `latest`: not ours to replace
    tmp = run_dir.parent / f".{LATEST}.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name, target_is_directory=True)
    os.replace(tmp, link)


class RunDirectory(pl.Callback):
    """Decides the run directory in `setup` and points unplaced loggers and checkpoint callbacks into it (rank 0
    creates it, and points `latest` at it when training starts). `run_dir` is the directory afterwards, the same on
    every rank."""

    def __init__(self) -> None:
        self.run_dir: Path | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        root = Path(trainer.default_root_dir)
        loggers = trainer.loggers
        first = loggers[0] if loggers else None
        if isinstance(first, (TensorBoard, CSV)) and not first.placed:
            first.place(root)
        if isinstance(first, (LightningTensorBoardLogger, LightningCSVLogger)):
            run_dir = Path(trainer.log_dir or root)  # Lightning numbers it on rank 0 and broadcasts it
        else:
            run_dir = Path(trainer.strategy.broadcast(str(next_run_dir(root)) if trainer.is_global_zero else None))
        for lg in loggers:
            if isinstance(lg, (TensorBoard, CSV)) and not lg.placed:
                lg.place(run_dir.parent, run_dir.name)  # the same version_N as the first logger
            elif isinstance(lg, WandbLogger) and not lg.placed:
                lg.place(run_dir)
        for cb in trainer.checkpoint_callbacks:
            if isinstance(cb, ModelCheckpoint) and cb.dirpath is None:
                cb.dirpath = str(run_dir / "checkpoints")
        if trainer.is_global_zero:
            run_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir = run_dir

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Only now, after a checkpoint to resume has loaded: a fit refused before training (another architecture's
        # checkpoint, bad data) must not turn `latest` away from the last run that trained.
        if trainer.is_global_zero and self.run_dir is not None:
            point_latest(self.run_dir)
