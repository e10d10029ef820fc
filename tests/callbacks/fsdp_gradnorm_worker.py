"""Run by `torchrun --nproc_per_node 2` (gloo, CPU): the gradient norm of a model sharded by torch FSDP (FSDP1 with
use_orig_params, as Lightning's FSDPStrategy wraps it, and FSDP2's `fully_shard`, as ModelParallelStrategy does),
next to the norm of the same gradient computed on an unsharded copy. Writes one JSON file per rank."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from polyformer.callbacks.stats import global_grad_norm


def model() -> nn.Module:
    torch.manual_seed(0)  # the same weights on every rank, as after Lightning's seeding
    # Odd sizes: the flat shards split parameters unevenly, some ranks hold only part of a tensor.
    return nn.Sequential(nn.Linear(7, 13), nn.GELU(), nn.Linear(13, 5), nn.GELU(), nn.Linear(5, 1))


def batch(rank: int) -> torch.Tensor:
    return torch.randn(6, 7, generator=torch.Generator().manual_seed(100 + rank))


def reference_norm(world: int) -> float:
    """The norm of the gradient every replica steps with: the mean over ranks of each rank's batch gradient."""
    full = model()
    loss = sum(full(batch(r)).pow(2).mean() for r in range(world)) / world
    loss.backward()
    return float(torch.nn.utils.get_total_norm([p.grad for p in full.parameters()]))


def run(wrapped: nn.Module, rank: int) -> dict[str, float]:
    wrapped(batch(rank)).pow(2).mean().backward()
    from torch.distributed.tensor import DTensor

    # This rank's shard only (FSDP1: plain tensors holding the local part; FSDP2: the DTensors' local tensors).
    local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in wrapped.parameters()]
    group = getattr(wrapped, "process_group", None)
    return {
        "sharded": float(global_grad_norm(wrapped, sharded=True, group=group)),
        "local": float(torch.nn.utils.get_total_norm([g for g in local if g is not None])),
    }


def main(out: Path) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result: dict[str, object] = {"reference": reference_norm(world)}
    base = model()
    fsdp1 = FSDP(copy.deepcopy(base), device_id=torch.device("cpu"), use_orig_params=True,
                 auto_wrap_policy=ModuleWrapPolicy({nn.Linear}))  # fmt: skip
    result["fsdp1"] = run(fsdp1, rank)

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    fsdp2 = copy.deepcopy(base)
    for layer in fsdp2:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(fsdp2, mesh=mesh)
    result["fsdp2"] = run(fsdp2, rank)

    # A rank that holds no gradient at all must still take part in the collective, or the others would hang.
    part = nn.Linear(2, 2)
    if rank == 0:
        for p in part.parameters():
            p.grad = torch.full_like(p, 0.5)  # 6 elements: norm sqrt(6 * 0.25)
    result["rank0_only"] = float(global_grad_norm(part, sharded=True, device=torch.device("cpu")))
    (out / f"gradnorm-{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
