"""2-process DDP (CPU, gloo) through the real CLI, for every task's tiny preset: after the fit every rank holds
bit-identical parameters, and the ranks trained on different data (their first batches, dumped by RankProbe)."""

from __future__ import annotations

import pytest
import torch
from e2e.scaleout import TASKS, last_checkpoint, max_abs_diff, polyformer, probe_args, read_probe, same_batch, task_args


@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("polyformer-cache")


@pytest.mark.slow
@pytest.mark.parametrize("task", list(TASKS))
def test_ddp_two_processes_stay_identical(task, tmp_path, cache):
    out = tmp_path / "probe"
    args = [
        "fit",
        *task_args(task),
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=4",
        "--trainer.limit_val_batches=2",
        f"--trainer.default_root_dir={tmp_path / 'run'}",
        *probe_args(out),
    ]
    polyformer(args, tmp_path, cache)
    r0, r1 = read_probe(out, 0), read_probe(out, 1)
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["global_step"] == r1["global_step"] == 4
    diff = max_abs_diff(r0["params"], r1["params"])
    print(f"{task}: max |rank0 - rank1| over {len(r0['params'])} tensors = {diff}")
    assert diff == 0.0, f"{task}: ranks diverged under DDP (max abs diff {diff})"
    assert not same_batch(r0["batch"], r1["batch"]), f"{task}: both ranks trained on the same first batch"
    last_checkpoint(tmp_path)  # the preset keeps a last.ckpt, which `--ckpt_path last` needs


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Lightning's FSDP strategy needs CUDA GPUs")
def test_fsdp_fit_and_resume_from_sharded_checkpoint(tmp_path, cache):
    fsdp = [*task_args("lm", trainer="fsdp.yaml"), f"--trainer.devices={min(2, torch.cuda.device_count())}",
            "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path / 'run'}"]  # fmt: skip
    polyformer(["fit", *fsdp, "--trainer.max_steps=2"], tmp_path, cache)
    last = last_checkpoint(tmp_path)
    assert last.is_dir(), "fsdp.yaml should write sharded checkpoints (a directory per checkpoint)"
    out = tmp_path / "probe"
    polyformer(["fit", *fsdp, "--trainer.max_steps=4", "--ckpt_path=last", *probe_args(out)], tmp_path, cache)
    probe = read_probe(out, 0)
    assert (probe["first_global_step"], probe["global_step"]) == (2, 4)
