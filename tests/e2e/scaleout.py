"""Helpers for the scale-out tests: tiny overrides of each task preset, a CLI runner for multi-process fits, and
`RankProbe`, a callback the fits load from this file (PYTHONPATH=tests/e2e) that writes what each rank saw:
its first training batch, its parameters at the end, whether the backbone was compiled, and the metrics it logged.
The tests read those files instead of assuming anything about the ranks.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch

from polyformer.parity import max_abs_diff  # noqa: F401  (re-exported for the e2e tests)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CONFIGS = ROOT / "configs"

# Each task's preset made tiny: a few seconds per step on 2 shared cores. Dropout stays on where the preset has it,
# so the resume tests also check that the random state comes back.
TASKS: dict[str, tuple[str, list[str]]] = {
    "lm": (
        "lm/tiny.yaml",
        [
            "--model.init_args.backbone.width=32",
            "--model.init_args.backbone.depth=1",
            "--model.init_args.backbone.heads=2",
            "--model.init_args.backbone.max_len=32",
            "--model.init_args.samples.prompts=[]",
            "--data.init_args.block_size=32",
            "--data.init_args.batch_size=8",
            "--data.init_args.bpe_vocab_size=512",
        ],
    ),
    "translation": (
        "translation/tiny.yaml",
        [
            "--model.init_args.backbone.width=32",
            "--model.init_args.backbone.depth=1",
            "--model.init_args.backbone.heads=2",
            "--model.init_args.decoder_depth=1",
            "--model.init_args.decoding.beam_size=1",
            "--data.init_args.bpe_vocab_size=300",
            "--data.init_args.batch_size=16",
            "--data.init_args.train_size=1000",
            "--data.init_args.val_size=37",
            "--data.init_args.test_size=37",
        ],
    ),
    "vit": (
        "vit/digits.yaml",
        [
            "--model.init_args.backbone.width=32",
            "--model.init_args.backbone.depth=1",
            "--model.init_args.backbone.heads=2",
            "--data.init_args.batch_size=32",
        ],
    ),
    "clip": (
        "clip/digits.yaml",
        [
            "--model.init_args.image.backbone.width=32",
            "--model.init_args.image.backbone.depth=1",
            "--model.init_args.image.backbone.heads=2",
            "--model.init_args.text.backbone.width=32",
            "--model.init_args.text.backbone.depth=1",
            "--model.init_args.text.backbone.heads=2",
            "--model.init_args.embed_dim=32",
            "--data.init_args.batch_size=32",
        ],
    ),
}

# Quiet, loggerless runs: the tests read RankProbe's files and the checkpoints.
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.logger=false"]


def task_args(task: str, *, trainer: str | None = "ddp-cpu.yaml") -> list[str]:
    preset, tiny = TASKS[task]
    path = CONFIGS / preset
    if not path.is_file():
        raise AssertionError(f"the {task} preset {path} does not exist (yet)")
    configs = [f"--config={path}"]
    if trainer:  # after the task preset: the task presets pin accelerator/devices for one CPU process
        configs.append(f"--config={CONFIGS / 'trainer' / trainer}")
    return configs + tiny + QUIET


def probe_args(out: Path) -> list[str]:
    return ["--trainer.callbacks+=scaleout.RankProbe", f"--trainer.callbacks.out_dir={out}"]


def cli_env(cache: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONWARNINGS": "ignore",
        "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        "POLYFORMER_CACHE": str(cache),  # tokenizers and token arrays are built once per test session
        "OMP_NUM_THREADS": "1",  # 2 processes on 2 cores
        **(extra or {}),
    }


def run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)}\nexited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}\n"
            f"--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def polyformer(args: list[str], cwd: Path, cache: Path, timeout: int = 600, env: dict | None = None):
    return run([sys.executable, "-m", "polyformer", *args], cwd, cli_env(cache, env), timeout)


def read_probe(out: Path, rank: int) -> dict[str, Any]:
    info = json.loads((out / f"rank{rank}.json").read_text())
    info["params"] = torch.load(out / f"rank{rank}-params.pt", weights_only=True)
    info["batch"] = torch.load(out / f"rank{rank}-batch.pt", weights_only=True)
    return info


def flat_tensors(batch: Any) -> list[torch.Tensor]:
    """The tensors of a batch (a tensor, tuple, list or dict), in a fixed order."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if isinstance(batch, dict):
        return [t for k in sorted(batch) for t in flat_tensors(batch[k])]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in flat_tensors(v)]
    return []


def same_batch(a: Any, b: Any) -> bool:
    ta, tb = flat_tensors(a), flat_tensors(b)
    return len(ta) == len(tb) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(ta, tb))


def last_checkpoint(root: Path) -> Path:
    """The one last.ckpt under root: presets may pin their checkpoint folder (relative to the working directory)
    instead of following trainer.default_root_dir, so look for it rather than assume where it is."""
    found = sorted(root.rglob("last.ckpt"))
    assert len(found) == 1, f"expected one last.ckpt under {root}, found {[str(p) for p in found]}"
    return found[0]


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


class RankProbe(L.Callback):
    """Writes <out_dir>/rank<r>-batch.pt (first training batch), rank<r>-params.pt (parameters after fit) and
    rank<r>.json (world size, steps, compile state, metrics after validate/test)."""

    def __init__(self, out_dir: str) -> None:
        self.out = Path(out_dir)
        if "SLURM_JOB_ID" in os.environ:  # a requeued job runs again with the same arguments: keep each run apart
            self.out = self.out / f"restart{os.environ.get('SLURM_RESTART_COUNT', '0')}"
        self.info: dict[str, Any] = {"losses": []}
        self._seen_batch = False

    def _write_info(self, trainer: L.Trainer) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.info, indent=1))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.info.update(world_size=trainer.world_size, rank=trainer.global_rank, num_nodes=trainer.num_nodes)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        if not self._seen_batch:
            self._seen_batch = True
            self.out.mkdir(parents=True, exist_ok=True)
            cpu = [t.detach().cpu() for t in flat_tensors(batch)]
            torch.save(cpu, self.out / f"rank{trainer.global_rank}-batch.pt")
            self.info["first_global_step"] = trainer.global_step  # > 0 when the fit resumed from a checkpoint
            self._write_info(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self.info["losses"].append(float(loss.detach()))  # this rank's loss of every training batch

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from polyformer.backbone import Transformer

        backbones = [m for m in pl_module.modules() if isinstance(m, Transformer)]
        params = {k: v.detach().cpu().clone() for k, v in pl_module.state_dict().items()}
        torch.save(params, self.out / f"rank{trainer.global_rank}-params.pt")
        self.info.update(
            global_step=trainer.global_step,
            # nn.Module.compile() sets _compiled_call_impl; the dynamo counter shows graphs were really captured.
            compiled=bool(backbones) and all(getattr(m, "_compiled_call_impl", None) is not None for m in backbones),
            dynamo_graphs=int(torch._dynamo.utils.counters["stats"]["unique_graphs"]),
            param_dtype=str(next(pl_module.parameters()).dtype),
        )
        self._write_info(trainer)

    def _metrics(self, trainer: L.Trainer, key: str) -> None:
        self.info[key] = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
        self._write_info(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._metrics(trainer, "validate")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._metrics(trainer, "test")
