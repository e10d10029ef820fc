"""Lightning's FSDP strategy, also on CPU, with atomic sharded checkpoints.

`lightning.pytorch.strategies.FSDPStrategy` as shipped cannot run on CPU: it hands torch's FSDP
`device_id=root_device.index`, which is None for a CPU device, and torch then refuses ("FSDP needs a non-CPU
accelerator device"). torch's FSDP itself trains on CPU with gloo when given `device_id=torch.device("cpu")`.
This subclass passes that device on CPU and is Lightning's class everywhere else, so the sharded path (flattened
parameters before `configure_optimizers`, sharded gradients and checkpoints) can be tested on CPU, in the parity
matrix, and debugged on a laptop before it goes to a GPU cluster. Sharded checkpoints are written into a temporary
directory and swapped into place (`polyformer.checkpointing.io.AtomicShardedSaves`): a kill mid-save leaves the
previous checkpoint whole.
"""

from __future__ import annotations

import torch
from lightning.fabric.strategies.fsdp import _setup_activation_checkpointing
from lightning.pytorch.strategies import FSDPStrategy as LightningFSDPStrategy
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel

from polyformer.checkpointing.io import AtomicShardedSaves


class FSDPStrategy(AtomicShardedSaves, LightningFSDPStrategy):
    """Lightning's FSDPStrategy (same arguments), runnable with `accelerator: cpu` (gloo) too; sharded checkpoints
    are atomic."""

    def _setup_model(self, model: nn.Module) -> nn.Module:
        on_cpu = self.root_device.type == "cpu"
        if not on_cpu or any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return super()._setup_model(model)
        model = FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
        _setup_activation_checkpointing(model, self._activation_checkpointing_kwargs)
        return model
