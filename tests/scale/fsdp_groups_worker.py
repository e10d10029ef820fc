"""Run by `torchrun --nproc_per_node 2`: wrap each tiny task in torch FSDP on CPU/gloo (as Lightning's FSDP strategy
does before `configure_optimizers`) and write the weight-decay groups each rank builds from the wrapped model."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from scale.tiny_tasks import tiny_tasks
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from polyformer.tasks.base import weight_decay_groups


def main(out: str) -> None:
    dist.init_process_group("gloo")
    result = {}
    for task, model in tiny_tasks().items():
        wrapped = FSDP(model, device_id=torch.device("cpu"), use_orig_params=True)
        groups = weight_decay_groups(wrapped, 0.1)
        result[task] = {
            "flat": all(p.ndim <= 1 for p in wrapped.parameters()),
            "groups": [[g["weight_decay"], sorted(g["param_names"])] for g in groups],
        }
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
