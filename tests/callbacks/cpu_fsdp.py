"""Lightning's FSDP strategy on CPU/gloo, for tests only.

As shipped, Lightning's FSDPStrategy hands torch's FSDP `device_id=self.root_device.index`, i.e. None on CPU, which
torch refuses on a machine without an accelerator ("FSDP needs a non-CPU accelerator device"); torch's FSDP itself
trains on CPU when given `device_id=torch.device("cpu")`. The mixin wraps the model itself with the CPU device and
lets the strategy's own `_setup_model` find it wrapped. (The accelerator connector refuses `accelerator=cpu` for
FSDPStrategy by exact type only, so a subclass passes.)
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn


class CPUDeviceMixin:
    kwargs: dict[str, Any]

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

        strategy: Any = self
        if not any(isinstance(m, FSDP) for m in model.modules()):
            model = FSDP(module=model, cpu_offload=strategy.cpu_offload,
                         mixed_precision=strategy.mixed_precision_config, sharding_strategy=strategy.sharding_strategy,
                         device_id=torch.device("cpu"), **self.kwargs)  # fmt: skip
        policy = self.kwargs.pop("auto_wrap_policy", None)  # applied above; the parent would warn that it is unused
        try:
            return super()._setup_model(model)  # type: ignore[misc]
        finally:
            if policy is not None:
                self.kwargs["auto_wrap_policy"] = policy


class CPUFSDPStrategy(CPUDeviceMixin, FSDPStrategy):
    """Lightning's FSDPStrategy, on CPU."""


def atomic_cpu_fsdp_strategy(**kwargs: Any) -> FSDPStrategy:
    """polyformer's AtomicFSDPStrategy, on CPU."""
    from polyformer.checkpoint_io import AtomicFSDPStrategy

    cls = type("CPUAtomicFSDPStrategy", (CPUDeviceMixin, AtomicFSDPStrategy), {})
    return cls(**kwargs)
