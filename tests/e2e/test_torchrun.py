"""scripts/torchrun.sh as on a cluster without SLURM: 2 "nodes" x 1 process, both on 127.0.0.1, static
rendezvous, `trainer.num_nodes=2`. Both nodes finish, see a world of 2, end with identical parameters, and
trained on different data."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from e2e.scaleout import ROOT, cli_env, max_abs_diff, probe_args, read_probe, same_batch, task_args


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_nodes_on_loopback(tmp_path):
    out = tmp_path / "probe"
    args = [*task_args("lm"), "--trainer.max_steps=3", "--trainer.limit_val_batches=1",
            f"--trainer.default_root_dir={tmp_path / 'run'}", *probe_args(out)]  # fmt: skip
    port = str(free_port())
    nodes = []
    for rank in (0, 1):
        env = cli_env(
            tmp_path / "cache",
            {
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
                "NNODES": "2",
                "NODE_RANK": str(rank),
                "NPROC_PER_NODE": "1",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": port,
            },
        )
        log = (tmp_path / f"node{rank}.log").open("w")
        cmd = [str(ROOT / "scripts" / "torchrun.sh"), *args]
        nodes.append((subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [p.wait(timeout=400) for p, _ in nodes]
    finally:
        for p, log in nodes:
            if p.poll() is None:
                p.kill()
            log.close()
    logs = "\n".join(f"--- node {r} ---\n" + (tmp_path / f"node{r}.log").read_text()[-3000:] for r in (0, 1))
    assert codes == [0, 0], f"torchrun exit codes {codes}\n{logs}"
    r0, r1 = read_probe(out, 0), read_probe(out, 1)
    assert (r0["world_size"], r0["num_nodes"], r1["world_size"]) == (2, 2, 2), logs
    diff = max_abs_diff(r0["params"], r1["params"])
    print(f"torchrun 2 nodes: max |rank0 - rank1| = {diff}")
    assert diff == 0.0
    assert not same_batch(r0["batch"], r1["batch"])
