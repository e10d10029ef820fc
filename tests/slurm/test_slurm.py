"""Our sbatch template on a real SLURM cluster (one host, started by `scripts/slurm/local-cluster.sh start`):
a 2-task DDP fit of the tiny LM, preempted with SIGUSR1 while it trains; Lightning saves an HPC checkpoint and
requeues the job; the requeued job resumes from that checkpoint's step and finishes the run.

Marked `slurm`: CI runs it in its own stage, after starting the cluster. Without a cluster it fails (it never
passes without one): deselect it with `-m "not slurm"`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from e2e.scaleout import HERE, ROOT, probe_args, task_args

pytestmark = pytest.mark.slurm

MAX_STEPS = 80  # long enough to still be training when the signal arrives, short enough to finish quickly


def sh(*cmd: str) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


def job_field(job: str, field: str) -> str | None:
    """A field of `scontrol show job` (kept for MinJobAge, 300 s, after the job ends)."""
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=60).stdout
    m = re.search(rf"\b{field}=(\S+)", out)
    return m[1] if m else None


def wait_for(what: str, check, timeout: float, job: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if job_field(job, "JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(1)
    text = log.read_text()[-6000:] if log.exists() else "(no job output)"
    pytest.fail(f"timed out waiting for {what} (job {job}: {job_field(job, 'JobState')})\n{text}")


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("sbatch") is None:
        pytest.fail("SLURM is not installed: run scripts/slurm/local-cluster.sh start first (or deselect -m slurm)")
    states = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True).stdout.split()
    if not any(s in ("idle", "mixed") for s in states):
        pytest.fail(f"no idle SLURM node (sinfo: {states}): run scripts/slurm/local-cluster.sh start")


def test_sbatch_ddp_fit_is_requeued_on_sigusr1_and_resumes(cluster, tmp_path):
    probe, root, log = tmp_path / "probe", tmp_path / "run", tmp_path / "job.out"
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # our venv's `polyformer`
        "PYTHONPATH": str(HERE),
        "PYTHONWARNINGS": "ignore",
        "POLYFORMER_CACHE": str(tmp_path / "cache"),
    }
    fit_args = [
        *task_args("lm"),
        f"--trainer.max_steps={MAX_STEPS}",
        "--trainer.val_check_interval=40",
        "--trainer.limit_val_batches=2",
        f"--trainer.default_root_dir={root}",
        *probe_args(probe),
    ]
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", f"--chdir={tmp_path}",
         f"--output={log}", str(ROOT / "scripts" / "slurm" / "single-node.sbatch"), *fit_args],
        env=env, capture_output=True, text=True, check=True, timeout=60,
    )  # fmt: skip
    job = submitted.stdout.strip().split(";")[0]
    try:
        # 1. Training has started on both ranks: preempt it like a time limit would (SIGUSR1 to the job's tasks).
        wait_for("the first training batch", lambda: (probe / "restart0" / "rank1-batch.pt").exists(), 300, job, log)
        sh("scancel", "--signal=USR1", job)
        # 2. Lightning saved the HPC checkpoint and requeued the job; release it from the requeue hold (~120 s).
        wait_for("the requeue", lambda: int(job_field(job, "Restarts") or 0) >= 1, 120, job, log)
        hpc = root / "hpc_ckpt_1.ckpt"
        assert hpc.is_file(), f"no HPC checkpoint in {root}: {sorted(p.name for p in root.glob('*'))}"
        sh("scontrol", "update", f"jobid={job}", "StartTime=now")
        # 3. The requeued run resumes from the checkpoint and completes.
        wait_for("the job to complete", lambda: job_field(job, "JobState") == "COMPLETED", 300, job, log)
    finally:
        subprocess.run(["scancel", job], capture_output=True, timeout=60)

    output = log.read_text()
    saved_step = torch.load(hpc, weights_only=True)["global_step"]
    assert 0 < saved_step < MAX_STEPS, f"the HPC checkpoint is at step {saved_step}"
    assert re.search(r"Restored all states from the checkpoint at .*hpc_ckpt_1\.ckpt", output), output[-4000:]
    first, second = (json.loads((probe / f"restart{n}" / "rank0.json").read_text()) for n in (0, 1))
    assert first["world_size"] == second["world_size"] == 2
    assert second["first_global_step"] == saved_step, "the requeued job did not continue from the saved step"
    assert second["global_step"] == MAX_STEPS
    print(f"preempted at step {saved_step}, requeued, resumed at step {second['first_global_step']}, "
          f"finished at {second['global_step']}")  # fmt: skip
