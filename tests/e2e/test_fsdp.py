"""FSDP through the real CLI: fit, write sharded checkpoints, resume from them. That every strategy trains the same
model as one process (DDP ranks bit-identical, and equal to the 1-process run on the same global batch) is the
parity matrix's job: tests/scale/test_parity.py."""

from __future__ import annotations

import pytest
import torch
from e2e.scaleout import last_checkpoint, polyformer, probe_args, read_probe, task_args


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("polyformer-cache")


@pytest.mark.slow
def test_fsdp_fit_and_resume_from_sharded_checkpoint(tmp_path, cache):
    # fsdp.yaml on GPUs; its CPU twin (same strategy class, gloo) runs here, sharded checkpoints included.
    trainer = "fsdp.yaml" if torch.cuda.device_count() >= 2 else "fsdp-cpu.yaml"
    fsdp = [*task_args("lm", trainer=trainer), "--trainer.devices=2", "--trainer.limit_val_batches=0",
            f"--trainer.default_root_dir={tmp_path / 'run'}"]  # fmt: skip
    polyformer(["fit", *fsdp, "--trainer.max_steps=2"], tmp_path, cache)
    last = last_checkpoint(tmp_path)
    assert last.is_dir(), "fsdp.yaml should write sharded checkpoints (a directory per checkpoint)"
    out = tmp_path / "probe"
    polyformer(["fit", *fsdp, "--trainer.max_steps=4", "--ckpt_path=last", *probe_args(out)], tmp_path, cache)
    probe = read_probe(out, 0)
    assert (probe["first_global_step"], probe["global_step"]) == (2, 4)
