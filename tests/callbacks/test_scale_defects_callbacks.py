"""Defects that only show at scale (several ranks, several GPUs, accumulation, sharding), each reproduced on CPU.

- RNG states per rank: each rank's own CPU/numpy/python stream and its own CUDA device's state (mocked here: no GPU)
  come back after a restart, in a real 2-process gloo run; checkpoints of the old single-state format still load.
- SLURM requeue: the HPC checkpoint is taken at an optimizer-step boundary, never halfway through accumulation.
- `train/grad_norm` under FSDP is the norm of the whole gradient, not of rank 0's shard (torch FSDP on CPU/gloo).
- Sharded FSDP checkpoints are swapped into place atomically: a writer killed mid-save leaves the old directory.

Multi-process parts run workers under `torch.distributed.run` as subprocesses (never DDP inside pytest).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch

from polyformer.checkpointing import rng
from polyformer.checkpointing.rng import RNGState, collect_rng_states, restore_rng_states

HERE = Path(__file__).parent


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(HERE / script), *args]  # fmt: skip
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


# ---------------------------------------------------------------------------------------------------------------------
# 1. RNG states per rank
# ---------------------------------------------------------------------------------------------------------------------


class FakeCuda:
    """torch.cuda as seen by rank 1 of a 2-GPU node: its current device is 1. Device 0 belongs to rank 0; its state
    as seen from this process was never advanced here, so saving or restoring it is wrong."""

    def __init__(self) -> None:
        self.current = 1
        self.states = {0: torch.full((8,), 10, dtype=torch.uint8), 1: torch.full((8,), 11, dtype=torch.uint8)}
        self.set_calls: list[tuple[int, torch.Tensor]] = []
        self.set_all_calls: list[list[torch.Tensor]] = []

    def _index(self, device: Any) -> int:
        if device is None or device == "cuda":
            return self.current
        if isinstance(device, int):
            return device
        device = torch.device(device)
        return self.current if device.index is None else device.index

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        cuda = torch.cuda
        monkeypatch.setattr(cuda, "is_available", lambda: True)
        monkeypatch.setattr(cuda, "is_initialized", lambda: True)
        monkeypatch.setattr(cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(cuda, "device_count", lambda: 2)
        monkeypatch.setattr(cuda, "get_rng_state", lambda device="cuda": self.states[self._index(device)].clone())
        monkeypatch.setattr(cuda, "get_rng_state_all", lambda: [self.states[0].clone(), self.states[1].clone()])
        monkeypatch.setattr(cuda, "set_rng_state", lambda new_state, device="cuda": self.set_calls.append(
            (self._index(device), new_state.clone())))  # fmt: skip
        monkeypatch.setattr(cuda, "set_rng_state_all", lambda new_states: self.set_all_calls.append(list(new_states)))


def test_cuda_state_of_the_current_device_only(monkeypatch):
    fake = FakeCuda()
    fake.install(monkeypatch)
    saved = collect_rng_states()
    assert isinstance(saved["cuda"], torch.Tensor), f"saved every visible device: {saved['cuda']!r}"
    assert torch.equal(saved["cuda"], fake.states[1]), "saved another device's state than this rank's own"

    restore_rng_states(saved)
    assert fake.set_all_calls == [], "restored a state into every device, including other ranks' devices"
    assert [(i, s.tolist()) for i, s in fake.set_calls] == [(1, fake.states[1].tolist())]


def test_cuda_state_in_an_old_checkpoint_restores_one_device(monkeypatch):
    """Old checkpoints hold `get_rng_state_all()` of rank 0: a list, one state per device."""
    fake = FakeCuda()
    fake.install(monkeypatch)
    monkeypatch.setattr(fake, "current", 0)  # a single-process run on device 0 saved it and resumes on device 0
    old = {**collect_rng_states(), "cuda": [fake.states[0].clone(), fake.states[1].clone()]}
    restore_rng_states(old)
    assert fake.set_all_calls == []
    assert [(i, s.tolist()) for i, s in fake.set_calls] == [(0, fake.states[0].tolist())]


def old_format_state() -> dict[str, Any]:
    """What the old `collect_rng_states` wrote: one state dict (rank 0's), not one per rank."""
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": pos,
            "has_gauss": has_gauss,
            "cached": cached,
        },  # fmt: skip
    }


def test_old_single_state_checkpoint_still_loads(tmp_path):
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    torch.save({"rng": old_format_state()}, tmp_path / "old.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.rand(9), np.random.rand(9), random.random()
    callback = RNGState()
    callback.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True)["rng"])
    callback.on_train_start(None, None)  # type: ignore[arg-type]
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]


def test_checkpoint_holds_one_entry_per_rank_and_loads_weights_only(tmp_path):
    torch.manual_seed(0)
    state = RNGState().state_dict()
    torch.save({"rng": state}, tmp_path / "c.pt")
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)["rng"]
    assert loaded["world_size"] == 1 and len(loaded["ranks"]) == 1
    assert torch.equal(loaded["ranks"][0]["torch"], torch.get_rng_state())


def test_changed_world_size_falls_back_to_rank_0_with_a_warning(monkeypatch):
    torch.manual_seed(0)
    rank0 = collect_rng_states()
    expected = torch.rand(4)
    torch.manual_seed(1)
    rank1 = collect_rng_states()
    warnings: list[str] = []
    monkeypatch.setattr(rng, "rank_zero_warn", lambda message, *a, **k: warnings.append(str(message)))
    callback = RNGState()
    callback.load_state_dict({"world_size": 2, "ranks": [rank0, rank1]})  # saved by 2 ranks, resumed by 1
    callback.on_train_start(None, None)  # type: ignore[arg-type]
    assert torch.equal(torch.rand(4), expected)
    callback.on_train_start(None, None)  # type: ignore[arg-type]
    assert len(warnings) == 1 and "differ" in warnings[0], warnings


@pytest.mark.slow
def test_each_rank_resumes_its_own_random_stream(tmp_path):
    for mode in ("save", "load"):
        proc = torchrun("rng_worker.py", mode, str(tmp_path))
        assert proc.returncode == 0, f"{mode}:\n{proc.stderr[-4000:]}"
    for rank in (0, 1):
        expected = json.loads((tmp_path / f"save-{rank}.json").read_text())
        resumed = json.loads((tmp_path / f"load-{rank}.json").read_text())
        assert resumed == expected, f"rank {rank} resumed another random stream"
    assert json.loads((tmp_path / "save-0.json").read_text()) != json.loads((tmp_path / "save-1.json").read_text())


# ---------------------------------------------------------------------------------------------------------------------
# 2. SLURM requeue at an optimizer-step boundary
# ---------------------------------------------------------------------------------------------------------------------


class TinyRegressor(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.layer(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class SignalAt(L.Callback):
    """Sends SIGUSR1 to this process while micro-batch `batch_idx` runs, as `scancel --signal=USR1` would."""

    def __init__(self, batch_idx: int) -> None:
        self.batch_idx = batch_idx

    def on_train_batch_start(self, trainer: L.Trainer, module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx == self.batch_idx:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_slurm_requeue_saves_at_an_optimizer_step_boundary(tmp_path, monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment
    from torch.utils.data import DataLoader, TensorDataset

    from polyformer.callbacks import slurm_requeue
    from polyformer.callbacks.slurm_requeue import SlurmRequeue

    for name, value in {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1",
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_NAME": "train",
                        "SLURM_NODELIST": "127.0.0.1"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    requeued: list[list[str]] = []
    monkeypatch.setattr(slurm_requeue.subprocess, "call", lambda cmd, *a, **k: requeued.append(cmd) or 0)

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=g)
    data = DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=2)  # 8 micro-batches, 4 steps an epoch
    previous = signal.getsignal(signal.SIGUSR1)
    try:
        trainer = L.Trainer(max_epochs=3, accumulate_grad_batches=2, plugins=[SLURMEnvironment()], accelerator="cpu",
                            devices=1, callbacks=[SlurmRequeue(), SignalAt(batch_idx=2)], logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            default_root_dir=tmp_path)  # fmt: skip
        # Micro-batch 2 is the first half of optimizer step 2: the save must wait for the step to finish.
        trainer.fit(TinyRegressor(), data)
    finally:
        signal.signal(signal.SIGUSR1, previous)

    assert requeued == [["scontrol", "requeue", "4242"]]
    assert trainer.global_step == 2, "training did not stop right after the step during which the signal came"
    hpc = sorted(tmp_path.glob("hpc_ckpt_*.ckpt"))
    assert len(hpc) == 1, list(tmp_path.iterdir())
    saved = torch.load(hpc[0], weights_only=True)
    batches = saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["processed"]
    assert saved["global_step"] == 2 and batches == 4, (
        f"HPC checkpoint at step {saved['global_step']} after {batches} micro-batches: mid-accumulation"
    )
    # Resumes right after that step: the remaining 2 steps of the epoch use micro-batches 4-7.
    resumed = L.Trainer(max_epochs=1, accumulate_grad_batches=2, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp_path)  # fmt: skip
    resumed.fit(TinyRegressor(), data, ckpt_path=hpc[0])
    assert resumed.global_step == 4
    assert resumed.fit_loop.epoch_loop.batch_progress.total.processed == 8


# ---------------------------------------------------------------------------------------------------------------------
# 3. The gradient norm of a sharded model
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grad_norm_of_a_sharded_model_is_the_whole_gradients(tmp_path):
    proc = torchrun("fsdp_gradnorm_worker.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"gradnorm-{r}.json").read_text()) for r in (0, 1)]
    reference = ranks[0]["reference"]
    for rank, result in enumerate(ranks):
        assert result["reference"] == reference
        for wrapper in ("fsdp1", "fsdp2"):
            print(f"rank {rank} {wrapper}: sharded {result[wrapper]['sharded']:.6f}, local shard "
                  f"{result[wrapper]['local']:.6f}, unsharded model {reference:.6f}")  # fmt: skip
            assert result[wrapper]["local"] < reference * (1 - 1e-3), "the shard is the whole gradient: no test"
            assert result[wrapper]["sharded"] == pytest.approx(reference, rel=1e-5), (rank, wrapper)
        assert result["rank0_only"] == pytest.approx(1.5**0.5, rel=1e-6)


@pytest.mark.slow
def test_logged_grad_norm_under_lightning_fsdp_is_the_whole_gradients(tmp_path):
    proc = torchrun("fsdp_lightning_worker.py", "gradnorm", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "gradnorm.json").read_text())
    print(f"logged train/grad_norm {result['logged']}, unsharded gradient {result['full']}")
    assert len(result["logged"]) == len(result["full"]) == 2
    assert result["logged"] == pytest.approx(result["full"], rel=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# 4. Sharded FSDP checkpoints are swapped into place atomically
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sharded_checkpoint_survives_a_rank_killed_while_saving(tmp_path):
    crashed = torchrun("fsdp_lightning_worker.py", "crash", str(tmp_path))
    assert crashed.returncode != 0, "the second save was meant to die"
    assert "exitcode: 17" in crashed.stderr, crashed.stderr[-4000:]
    last = tmp_path / "last.ckpt"
    assert last.is_dir() and (last / "meta.pt").is_file()
    meta = torch.load(last / "meta.pt", weights_only=True)
    assert meta["global_step"] == 2
    # The old directory is whole: Lightning's own loading under the strategy reads it back, weights and all.
    resumed = torchrun("fsdp_lightning_worker.py", "resume", str(tmp_path))
    assert resumed.returncode == 0, f"the old checkpoint does not load:\n{resumed.stderr[-4000:]}"
    result = json.loads((tmp_path / "resumed.json").read_text())
    assert result["same_keys"] and result["max_abs_diff"] == 0.0, result
    assert result["global_step"] == result["expected_step"] == 2
    # The save after the resume replaced it and removed what the killed save left.
    assert torch.load(last / "meta.pt", weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("last.ckpt")) == ["last.ckpt"]


def make_old(target: Path) -> None:
    target.mkdir()
    (target / "shard-0").write_text("old 0")
    (target / "shard-1").write_text("old 1")
    (target / "only-old").write_text("old")


def contents(directory: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(directory.iterdir())}


OLD = {"only-old": "old", "shard-0": "old 0", "shard-1": "old 1"}
NEW = {"shard-0": "new 0", "shard-1": "new 1"}


def write_new(directory: Path) -> None:
    (directory / "shard-0").write_text("new 0")
    (directory / "shard-1").write_text("new 1")


@pytest.mark.parametrize("exchange", [True, False], ids=["rename-exchange", "two-renames"])
def test_directory_is_replaced_as_a_whole(tmp_path, monkeypatch, exchange):
    from polyformer.checkpointing import files

    if not exchange:
        monkeypatch.setattr(files, "_rename_exchange", lambda a, b: False)
    target = tmp_path / "last.ckpt"
    make_old(target)
    files.write_directory_atomically(target, write_new)
    assert contents(target) == NEW  # nothing of the old directory is mixed in
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    (tmp_path / "file.ckpt").write_text("a full checkpoint")  # a file replaced by a sharded directory
    files.write_directory_atomically(tmp_path / "file.ckpt", write_new)
    assert contents(tmp_path / "file.ckpt") == NEW


def swap_worker(mode: str, target: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(HERE / "dir_swap_worker.py"), mode, str(target)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_writer_killed_mid_write_leaves_the_old_directory(tmp_path):
    from polyformer.checkpointing.files import write_directory_atomically

    target = tmp_path / "last.ckpt"
    make_old(target)
    proc = swap_worker("die-writing", target)
    assert proc.returncode == 3, proc.stderr
    assert contents(target) == OLD
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith("last.ckpt.tmp-"), leftovers  # the killed write's
    write_directory_atomically(target, write_new)
    assert contents(target) == NEW
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"], "the next save did not remove the dead write"


def test_swap_killed_between_its_renames_keeps_the_old_directory(tmp_path):
    from polyformer.checkpointing.files import remove_stale_temporaries, write_directory_atomically

    target = tmp_path / "last.ckpt"
    make_old(target)
    proc = swap_worker("die-swapping", target)
    assert proc.returncode == 4, proc.stderr
    moved = [p for p in tmp_path.iterdir() if ".old-" in p.name]
    assert not target.exists() and len(moved) == 1 and contents(moved[0]) == OLD  # complete, under another name
    remove_stale_temporaries(target)  # what the next save (or a sharded load) does first
    assert contents(target) == OLD
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    write_directory_atomically(target, write_new)
    assert contents(target) == NEW
