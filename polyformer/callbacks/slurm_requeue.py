"""SLURM preemption without deadlocks: save the HPC checkpoint and requeue at a point where every rank agrees.

Lightning's own SIGUSR1 handler calls `trainer.save_checkpoint` (which holds a barrier) from inside the signal
handler, at whatever line each rank happens to be on. Under DDP one rank can then wait in that barrier while the
other waits in backward's gradient all-reduce, and the job hangs until SLURM kills it, without a checkpoint
(observed on our one-host cluster: rank 0 in `Trainer.save_checkpoint -> barrier` inside `Tensor.backward`,
rank 1 in `_engine_run_backward`). Here the handler only records the signal; after each training batch that ended
with an optimizer step the ranks OR their flags (one scalar all-reduce), and if any was signalled all of them save
`hpc_ckpt_<n>.ckpt` together, rank 0 runs `scontrol requeue`, and training stops. The requeued job resumes from that
checkpoint as usual (Lightning loads the newest `hpc_ckpt_*.ckpt` when `ckpt_path` is not given).

Only at optimizer-step boundaries: with gradient accumulation, a save after the first micro-batches of a step would
store weights and optimizer state from before the step next to a loop position inside it, and the gradients
accumulated so far are not in the checkpoint, so the resumed step would be computed from the remaining micro-batches
alone. Lightning's own decision (`fit_loop._should_accumulate()`, read after the batch, when the step has run)
tells where the boundaries are; it depends only on batch counts, so all ranks agree on it and enter the all-reduce
together. Under manual optimization Lightning does not accumulate, so every batch is a boundary.

Installed in `setup`, before Lightning registers its handlers, so Lightning sees a SIGUSR1 handler and leaves it.
Does nothing outside SLURM or with `SLURMEnvironment(auto_requeue=False)`.
"""

from __future__ import annotations

import os
import signal
import subprocess
from typing import Any

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn


class SlurmRequeue(L.Callback):
    """On SLURM's requeue signal: checkpoint on every rank after the next optimizer step, requeue, stop."""

    def __init__(self) -> None:
        self._signalled = False
        self._active = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        env = trainer._accelerator_connector.cluster_environment
        if stage != "fit" or not isinstance(env, SLURMEnvironment) or not env.auto_requeue:
            return
        self._active = True
        signal.signal(env.requeue_signal or signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._signalled = True  # nothing else here: any collective inside a signal handler can deadlock

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not self._active or trainer.fit_loop._should_accumulate():
            return  # mid-accumulation: wait for the optimizer step (the same answer on every rank)
        if not trainer.strategy.reduce_boolean_decision(self._signalled, all=False):
            return
        rank_zero_info(f"SLURM requeue signal received: saving an HPC checkpoint at step {trainer.global_step}")
        for logger in trainer.loggers:
            logger.finalize("finished")
        trainer.save_checkpoint(trainer._checkpoint_connector.hpc_save_path(trainer.default_root_dir))
        if trainer.is_global_zero:
            array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
            job = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ["SLURM_JOB_ID"]
            result = subprocess.call(["scontrol", "requeue", job])
            if result == 0:
                rank_zero_info(f"Requeued SLURM job: {job}")
            else:
                rank_zero_warn(f"`scontrol requeue {job}` failed with exit code {result}")
        trainer.should_stop = True
