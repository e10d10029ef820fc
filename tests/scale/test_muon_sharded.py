"""Muon under FSDP without Lightning: each rank holds 1-D slices of the matrices, Newton-Schulz needs them whole, so
the optimizer gathers them over the sharding group. Two gloo processes must train the weights one process trains on
the whole batch. (Through Lightning, DDP and FSDP included: the parity matrix's lm-muon cells.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


@pytest.mark.slow  # two torchrun processes: ~15 s on two cores
def test_fsdp_muon_trains_the_one_process_weights(tmp_path):
    sys.path.insert(0, str(HERE))
    from muon_fsdp_worker import batches, loss_of, optimizer, tiny_gpt

    out = tmp_path / "fsdp.pt"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(HERE / "muon_fsdp_worker.py"), str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    sharded = torch.load(out, weights_only=True)
    assert sum(sharded["split"]) >= 2, "no matrix was split across the ranks: the test checks nothing"
    assert sharded["state_keys"] == ["exp_avg", "exp_avg_sq", "step"]

    model = tiny_gpt()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = optimizer(model)
    for tokens in batches():
        opt.zero_grad()
        loss_of(model, tokens).backward()
        opt.step()
    for name, p in model.named_parameters():
        moved = (p.detach() - initial[name]).norm()
        # float32 reassociation (two half-batch means vs one), relative to how far the step moved the weights
        assert (sharded["weights"][name] - p.detach()).norm() <= 1e-3 * moved + 1e-7, name
