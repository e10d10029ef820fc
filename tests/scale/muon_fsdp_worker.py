"""Run by `torchrun --nproc_per_node 2`: a tiny GPT wrapped in torch FSDP on CPU/gloo (flat 1-D shards, as under
Lightning's FSDP strategy), trained a few steps with Muon gathering each matrix over the sharding group; rank 0 writes
the full weights, whether the matrices really were split across the ranks, and the optimizer state's keys as
FSDP.optim_state_dict (what a checkpoint saves) gathers them."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from polyformer.backbone import TransformerConfig
from polyformer.models.gpt import GPT, GPTConfig
from polyformer.optim import Muon, split_muon_groups
from polyformer.tasks.base import clean_name, hidden_matrices, weight_decay_groups

STEPS, BATCH = 3, 8


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    cfg = TransformerConfig(width=32, depth=2, heads=4, max_len=16, causal=True, dropout=0.0, qk_norm=True)
    return GPT(GPTConfig(cfg, vocab_size=50, tie_embeddings=False))


def batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 50, (BATCH, 9), generator=gen) for _ in range(STEPS)]


def optimizer(model: torch.nn.Module, process_group=None) -> Muon:
    groups = split_muon_groups(weight_decay_groups(model, 0.1), hidden_matrices(model), lr=1e-2)
    return Muon(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, process_group=process_group)


def loss_of(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())


def main(out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = FSDP(tiny_gpt(), device_id=torch.device("cpu"), use_orig_params=True)
    opt = optimizer(model, model.process_group)
    muon = opt.param_groups[0]
    split = [p.numel() < torch.Size(s).numel() for p, s in zip(muon["params"], muon["shapes"])]
    for tokens in batches():  # each rank trains its half of the batch; FSDP averages the gradients
        opt.zero_grad()
        loss_of(model, tokens[rank * BATCH // world : (rank + 1) * BATCH // world]).backward()
        opt.step()
    # What Lightning's FSDP strategy saves in a checkpoint: every rank joins; it fails on uneven optimizer state.
    full_state = FSDP.optim_state_dict(model, opt)
    with FSDP.summon_full_params(model, writeback=False):
        weights = {clean_name(n): p.detach().clone() for n, p in model.named_parameters()}
    if rank == 0:
        keys = sorted({k for state in full_state["state"].values() for k in state})
        torch.save({"weights": weights, "split": split, "state_keys": keys}, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
