"""Run by `torchrun --nproc_per_node 2` (gloo): per-rank RNG streams through `RNGState` and a restart.

`save OUT`: every rank is seeded alike, then draws a different amount (as translation batches of different lengths
draw different dropout masks), snapshots its states the way training does (`on_train_batch_end`), writes the
callback's `state_dict()` (a collective) to `OUT/rng.pt` from rank 0, and records the draws it makes next.
`load OUT`: fresh processes, seeded differently, load `OUT/rng.pt` with `weights_only=True`, restore as a resumed fit
does (`on_train_start`) and record their draws. Each rank's draws must be the ones it would have made without the
restart.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from polyformer.checkpointing.rng import RNGState


def draws() -> dict[str, list[float]]:
    return {
        "torch": torch.rand(5).tolist(),
        "numpy": np.random.rand(5).tolist(),
        "python": [random.random() for _ in range(5)],
    }


def seed(value: int) -> None:
    torch.manual_seed(value)
    np.random.seed(value)
    random.seed(value)


def main(mode: str, out: Path) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    callback = RNGState()
    if mode == "save":
        seed(0)
        n = 1 + 3 * rank  # the ranks' streams diverge
        torch.rand(n), np.random.rand(n), [random.random() for _ in range(n)]
        callback.on_train_batch_end(None, None, None, None, 0)  # type: ignore[arg-type]  # the end of a batch
        state = callback.state_dict()  # every rank: it gathers
        if rank == 0:
            torch.save({"rng": state}, out / "rng.pt")
        result = draws()
    else:
        seed(1234)  # a fresh process: the restored state, not the seed, must decide the draws
        callback.load_state_dict(torch.load(out / "rng.pt", weights_only=True)["rng"])
        callback.on_train_start(None, None)  # type: ignore[arg-type]  # what a resumed fit calls
        result = draws()
    (out / f"{mode}-{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
