#!/usr/bin/env python
"""The parity matrix on real GPUs: every task x every setting (NCCL DDP and FSDP over all visible devices, gradient
accumulation, resume, activation checkpointing, compile, bf16-mixed, bf16-true and fp16 with gradient scaling)
against the 1-GPU fp32 run, printed as a Markdown table. The settings, tasks and tolerances are those of the CPU
matrix that CI runs (`polyformer.parity`, tests/scale/test_parity.py); only the accelerator and fp16 are added.

    python scripts/parity.py --out parity-gpu                 # 2 processes on 2 GPUs where a setting is distributed
    python scripts/parity.py --out parity-gpu --tasks lm vit  # a subset

Exit status 1 when a cell fails, so a cluster's smoke job can run it before a long training run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from polyformer import parity


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("parity-gpu"))
    parser.add_argument("--tasks", nargs="+", default=list(parity.TASKS), choices=list(parity.TASKS))
    parser.add_argument("--steps", type=int, default=parity.STEPS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: run `python -m polyformer.parity matrix --out DIR` for the CPU matrix", file=sys.stderr)
        return 2
    if torch.cuda.device_count() < 2:
        print("note: 1 GPU visible; the 2-process settings need 2 and will fail to start", file=sys.stderr)
    settings = parity.all_settings(["16-mixed"])
    failures = parity.matrix(args.out, settings, args.tasks, "gpu", args.steps, env={"OMP_NUM_THREADS": "4"})
    for name, text in failures.items():
        print(f"== {name} did not run ==\n{text}\n", file=sys.stderr)
    cells = parity.compare(args.out, settings, args.tasks, args.steps)
    print(f"device: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}\n")
    print(parity.table(cells, settings))
    return int(bool(failures) or any(c.status in ("FAIL", "missing") for c in cells))


if __name__ == "__main__":
    sys.exit(main())
