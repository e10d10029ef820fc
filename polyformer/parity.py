"""Scaled out is the same run: the parity matrix.

Each task's preset, made tiny, trains K optimizer steps with a fixed seed in one *setting* (2-process DDP, 2-process
FSDP, gradient accumulation, resume halfway with 0 or 2 loader workers, activation checkpointing, compile, bf16) and
is compared with the 1-process fp32 run on the same global batch: the loss of every step, the final weights, the
optimizer's parameter groups (names and weight decay), the logged gradient norm and the learning rate.

What "the same global batch" means per task. LM, ViT and CLIP: the reference trains batches of B samples; a split
setting (2 ranks, or 2 accumulated micro-batches) trains B/2 per micro-batch, and the resumable sampler gives the two
halves exactly the samples of the reference's batch. Translation batches are length buckets, and rank r trains every
world-th bucket, so its reference is 1 process accumulating 2 buckets per step (the same two buckets a 2-rank step
trains). Per-sample augmentation is seeded by (seed, epoch, index) in the loaders, so it does not depend on the rank,
the number of workers or where a run resumed. Dropout is off: a rank draws other masks than a single process does.

Cells that cannot be equal say why instead of running: CLIP (either loss) with accumulated micro-batches sees fewer
negatives per loss (a different objective, as in open_clip without gradient caching); translation's accumulation is
its reference; the LM and translation data modules load in-process and have no workers. Variants of a task (lm-muon,
clip-siglip) run only the settings where their difference meets the scale-out; elsewhere they compute what the base
task's cell already checks.

Run it:
    python -m polyformer.parity matrix --out parity-out                      # every setting on CPU, then the table
    python -m polyformer.parity matrix --accelerator gpu --extra 16-mixed --out DIR  # 2 GPUs, fp16 added
    python -m polyformer.parity run --setting ddp --out parity-out            # one setting (what the matrix runs)
    python -m polyformer.parity compare --out parity-out                      # the table of what has run
    python -m polyformer.parity matrix --tasks lm-muon --settings ddp fsdp --out DIR  # some cells only
The test suite runs the CPU matrix (tests/scale/test_parity.py); scripts/parity.py runs it on GPUs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
STEPS = 6  # optimizer steps per run; resume settings stop after STEPS // 2 and continue from last.ckpt

# ---- the tasks, made tiny ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskSpec:
    preset: str  # under configs/
    args: tuple[str, ...]  # tiny sizes, dropout off
    batch: int  # samples per micro-batch of the reference
    buckets: bool = False  # micro-batches are whole length buckets: the reference accumulates 2 of them
    workers: bool = False  # the data module loads in worker processes (num_workers)
    optimizer_only: bool = False  # another optimizer for a task above: only the settings that change its inputs
    only: tuple[str, ...] = ()  # non-empty: only these settings (another loss for a task above: its cross-rank part)


M, D = "--model.init_args", "--data.init_args"
TASKS: dict[str, TaskSpec] = {
    "lm": TaskSpec(
        "lm/tiny.yaml",
        (f"{M}.backbone.width=32", f"{M}.backbone.depth=2", f"{M}.backbone.heads=2", f"{M}.backbone.max_len=32",
         f"{M}.backbone.dropout=0.0", f"{M}.samples.prompts=[]", f"{D}.block_size=32", f"{D}.bpe_vocab_size=512"),
        batch=8,
    ),
    # The LM again with Muon for its hidden matrices: the optimizer that must gather FSDP's shards of each matrix.
    "lm-muon": TaskSpec(
        "lm/tiny.yaml",
        (f"{M}.backbone.width=32", f"{M}.backbone.depth=2", f"{M}.backbone.heads=2", f"{M}.backbone.max_len=32",
         f"{M}.backbone.dropout=0.0", f"{M}.samples.prompts=[]", f"{D}.block_size=32", f"{D}.bpe_vocab_size=512",
         f"{M}.optimizer.name=muon"),
        batch=8,
        optimizer_only=True,
    ),
    "translation": TaskSpec(
        "translation/tiny.yaml",
        (f"{M}.backbone.width=32", f"{M}.backbone.depth=1", f"{M}.backbone.heads=2", f"{M}.decoder_depth=1",
         f"{M}.backbone.dropout=0.0", f"{M}.decoding.beam_size=1", f"{D}.bpe_vocab_size=300",
         f"{D}.train_size=1000", f"{D}.val_size=37", f"{D}.test_size=37"),
        batch=16,
        buckets=True,
    ),
    "vit": TaskSpec(
        "vit/digits.yaml",
        (f"{M}.backbone.width=32", f"{M}.backbone.depth=2", f"{M}.backbone.heads=2", f"{M}.backbone.dropout=0.0"),
        batch=32,
        workers=True,
    ),
    "clip": TaskSpec(
        "clip/digits.yaml",
        (f"{M}.image.backbone.width=32", f"{M}.image.backbone.depth=1", f"{M}.image.backbone.heads=2",
         f"{M}.text.backbone.width=32", f"{M}.text.backbone.depth=1", f"{M}.text.backbone.heads=2",
         f"{M}.image.backbone.dropout=0.0", f"{M}.text.backbone.dropout=0.0", f"{M}.embed_dim=32"),
        batch=32,
        workers=True,
    ),
    # CLIP with SigLIP's sigmoid loss: only the texts are gathered across ranks, and the bias is a parameter too.
    "clip-siglip": TaskSpec(
        "clip/digits.yaml",
        (f"{M}.image.backbone.width=32", f"{M}.image.backbone.depth=1", f"{M}.image.backbone.heads=2",
         f"{M}.text.backbone.width=32", f"{M}.text.backbone.depth=1", f"{M}.text.backbone.heads=2",
         f"{M}.image.backbone.dropout=0.0", f"{M}.text.backbone.dropout=0.0", f"{M}.embed_dim=32", f"{M}.loss=siglip"),
        batch=32,
        workers=True,
        only=("ddp", "fsdp"),
    ),
    # BERT's masked LM: a bidirectional encoder whose masks are drawn per sample while loading (data/masked_text.py).
    "bert-mlm": TaskSpec(
        "bert/tiny-mlm.yaml",
        (f"{M}.backbone.width=32", f"{M}.backbone.depth=2", f"{M}.backbone.heads=2", f"{M}.backbone.max_len=32",
         f"{M}.backbone.dropout=0.0", f"{D}.block_size=32", f"{D}.bpe_vocab_size=512"),
        batch=8,
        workers=True,
        only=("ddp", "resume", "resume-workers"),
    ),
}  # fmt: skip


# ---- the settings --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tolerance:
    """How close a setting must come to the reference. `loss` and `grad_norm`: the largest relative difference
    over the steps. `weights`: ||w - w_ref|| / ||w_ref - w_0|| over all parameters (L2), the difference in where
    training went relative to how far it went; a max-abs measure would be ruled by the few weights whose gradient
    is ~0, where Adam's division by sqrt(v) turns any rounding into a step of up to lr."""

    loss: float
    grad_norm: float
    weights: float
    why: str


EXACT = Tolerance(0.0, 0.0, 0.0, "the same operations in the same order: bit-identical")
# DDP/FSDP reduce a gradient as the mean of two half-batch gradients, accumulation adds two, compile fuses kernels:
# the same math, other float32 rounding (~6e-8 relative per operation). Measured on CPU (6 steps): loss <= 2e-7,
# grad norm <= 2e-6, weights <= 2.5e-4 (CLIP, whose temperature amplifies logits); bounds leave 4-50x headroom.
REASSOCIATED = Tolerance(1e-5, 1e-4, 1e-3, "the same math reassociated (float32 rounding)")
# bf16 autocast: matmul inputs rounded to 8 bits of mantissa (2^-8 = 0.4% relative), fp32 weights and optimizer.
# Measured: loss <= 8e-4, grad norm <= 2.4e-2, weights <= 7.5e-2.
BF16_MIXED = Tolerance(5e-3, 1e-1, 1.5e-1, "matmuls in bf16 (2^-8 relative), fp32 master weights")
# bf16-true: weights (from their initialisation on), gradients and optimizer state in bf16.
BF16_TRUE = Tolerance(2e-2, 2e-1, 5e-1, "weights, gradients and optimizer state in bf16 (2^-8 relative)")


@dataclass(frozen=True)
class Setting:
    name: str
    what: str
    tolerance: Tolerance
    processes: int = 1
    accumulate: int = 1  # micro-batches per step within a process
    args: tuple[str, ...] = ()
    resume: bool = False
    workers: int = 0
    precision: str = "32-true"

    @property
    def split(self) -> bool:  # the reference's global batch is trained as two micro-batches
        return self.processes * self.accumulate == 2


FSDP_STRATEGY = json.dumps(
    {"class_path": "polyformer.strategies.FSDPStrategy",
     "init_args": {"auto_wrap_policy": ["polyformer.backbone.layers.Block"], "sharding_strategy": "FULL_SHARD",
                   "state_dict_type": "sharded"}}
)  # fmt: skip

REFERENCE = Setting("reference", "1 process, fp32", EXACT)
SETTINGS: dict[str, Setting] = {
    s.name: s
    for s in [
        Setting("ddp", "2 processes, DDP (gloo on CPU)", REASSOCIATED, processes=2, args=("--trainer.strategy=ddp",)),
        Setting("fsdp", "2 processes, FSDP full shard", REASSOCIATED, processes=2,
                args=(f"--trainer.strategy={FSDP_STRATEGY}",)),
        Setting("accumulation", "1 process, 2 x half batch accumulated", REASSOCIATED, accumulate=2),
        Setting("resume", "stop at K/2, resume from last.ckpt", EXACT, resume=True),
        Setting("resume-workers", "stop at K/2, resume, 2 loader workers", EXACT, resume=True, workers=2),
        Setting("activation-checkpointing", "blocks recomputed in backward", EXACT,
                args=(f"{M}.activation_checkpointing=true",)),
        Setting("compile", "torch.compile of each backbone", REASSOCIATED, args=(f"{M}.compile=true",)),
        Setting("bf16-mixed", "bf16 autocast", BF16_MIXED, precision="bf16-mixed"),
        Setting("bf16-true", "bf16 weights and compute", BF16_TRUE, precision="bf16-true"),
    ]
}  # fmt: skip
# Where an optimizer sees other gradients, other parameter layouts or restored state than one process does.
OPTIMIZER_SETTINGS = ("ddp", "fsdp", "accumulation", "resume")
GPU_ONLY = {"16-mixed": Setting("16-mixed", "fp16 autocast + gradient scaling", BF16_MIXED, precision="16-mixed")}


def not_applicable(task: str, setting: Setting) -> str | None:
    """Why a cell cannot be compared, or None."""
    spec = TASKS[task]
    if task in ("clip", "clip-siglip") and setting.accumulate > 1:
        return "contrastive loss over half batches has half the negatives: another objective, not a scale-out"
    if spec.buckets and setting.accumulate > 1:
        return "translation's reference already accumulates 2 length buckets per step"
    if setting.workers and not spec.workers:
        return "this data module loads in-process (no worker processes)"
    if spec.optimizer_only and setting.name not in (REFERENCE.name, *OPTIMIZER_SETTINGS):
        return "the model's computation is the LM cell's; the optimizer's inputs are those of one process"
    if task == "bert-mlm" and setting.name not in (REFERENCE.name, *spec.only):
        return "the backbone's other settings are the LM cell's; here: masks drawn per sample across ranks, resume"
    if spec.only and setting.name not in (REFERENCE.name, *spec.only):
        return "the model's computation is the CLIP cell's; the loss's cross-rank exchange is not involved"
    return None


# ---- command lines -------------------------------------------------------------------------------------------------


def cli_args(task: str, setting: Setting, out: Path, accelerator: str, steps: int, phase: str = "") -> list[str]:
    """The `polyformer fit` command line of one cell (one phase of a resume)."""
    spec = TASKS[task]
    # Translation: micro-batches are buckets, always 2 per step; the others split the reference batch in two.
    accumulate = 2 // setting.processes if spec.buckets else setting.accumulate
    batch = spec.batch // 2 if setting.split and not spec.buckets else spec.batch
    run = out / setting.name / task
    callbacks = [
        {"class_path": "polyformer.checkpointing.ResumableCheckpoint",
         "init_args": {"dirpath": str(run / "checkpoints"), "save_last": True}},
        {"class_path": "polyformer.parity.ParityProbe", "init_args": {"out_dir": str(run), "phase": phase}},
    ]  # fmt: skip
    args = [
        "fit", f"--config={CONFIGS / spec.preset}", *spec.args,
        "--seed_everything=0", f"--trainer.accelerator={accelerator}", f"--trainer.devices={setting.processes}",
        "--trainer.num_nodes=1", "--trainer.strategy=auto", f"--trainer.precision={setting.precision}",
        f"--trainer.accumulate_grad_batches={accumulate}", f"--trainer.max_steps={steps}",
        "--trainer.max_epochs=-1", "--trainer.limit_val_batches=0", "--trainer.log_every_n_steps=1",
        "--trainer.logger=false", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=true", f"--trainer.default_root_dir={run}",
        f"--trainer.callbacks={json.dumps(callbacks)}",
        f"{M}.optimizer.warmup_steps=1",  # peak lr from the second step: small runs then move the weights
        f"{M}.optimizer.max_steps={steps}",  # the schedule's length, also for the first half of a resume
        f"{D}.batch_size={batch}",
        *setting.args,
    ]  # fmt: skip
    if spec.workers:
        args.append(f"{D}.num_workers={setting.workers}")
    if phase == "first":
        args[args.index(f"--trainer.max_steps={steps}")] = f"--trainer.max_steps={steps // 2}"
    elif phase == "second":
        args.append(f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}")
    return args


def run_setting(setting: Setting, out: Path, tasks: list[str], accelerator: str, steps: int) -> None:
    """Train every applicable task in this process, one after another (under DDP Lightning re-runs this command
    line for the other ranks, which then train the same tasks in the same order)."""
    from polyformer.cli import run_lightning_cli

    for task in tasks:
        if not_applicable(task, setting):
            continue
        phases = ["first", "second"] if setting.resume else [""]
        for phase in phases:
            run_lightning_cli(cli_args(task, setting, out, accelerator, steps, phase))


# ---- what each rank saw --------------------------------------------------------------------------------------------


class ParityProbe(L.Callback):
    """Writes, per rank, `probe<phase>-rank<r>.json` (each micro-batch's loss, each step's lr and logged gradient
    norm, the optimizer's groups) and `weights<phase>-rank<r>.pt` (the full parameters after fit, gathered from FSDP
    shards)."""

    def __init__(self, out_dir: str, phase: str = "") -> None:
        self.out, self.phase = Path(out_dir), phase
        self.info: dict[str, Any] = {"micro_losses": [], "lr": {}, "grad_norm": {}}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.info.update(world_size=trainer.world_size, first_step=trainer.global_step)
        if self.phase != "second":  # the starting point: what each update is measured from
            self._save_weights(trainer, pl_module, "initial")
        self.info["groups"] = [
            [g["weight_decay"], sorted(g.get("param_names", []))] for g in trainer.optimizers[0].param_groups
        ]

    def _record_grad_norm(self, trainer: L.Trainer) -> None:
        # Metrics logged during a step reach callback_metrics after on_train_batch_end: read them one hook later.
        norm = trainer.callback_metrics.get("train/grad_norm")
        if norm is not None and trainer.global_step > self.info["first_step"]:
            self.info["grad_norm"][str(trainer.global_step - 1)] = float(norm)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, idx: int) -> None:
        self._record_grad_norm(trainer)
        self.info["lr"][str(trainer.global_step)] = trainer.optimizers[0].param_groups[0]["lr"]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           idx: int) -> None:  # fmt: skip
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        # Lightning hands back the loss divided by accumulate_grad_batches; keep the micro-batch's own loss.
        step = trainer.global_step - (1 if self._stepped(trainer, idx) else 0)
        self.info["micro_losses"].append([step, float(loss) * trainer.accumulate_grad_batches])

    @staticmethod
    def _stepped(trainer: L.Trainer, idx: int) -> bool:
        return (idx + 1) % trainer.accumulate_grad_batches == 0

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._record_grad_norm(trainer)
        self.info["last_step"] = trainer.global_step
        self.info["param_dtype"] = str(next(pl_module.parameters()).dtype)
        self._save_weights(trainer, pl_module, f"weights{self.phase}")
        (self.out / f"probe{self.phase}-rank{trainer.global_rank}.json").write_text(json.dumps(self.info))

    def _save_weights(self, trainer: L.Trainer, pl_module: L.LightningModule, name: str) -> None:
        from polyformer.tasks.base import clean_name

        with full_parameters(trainer):  # every rank takes part in FSDP's gather
            weights = {clean_name(n): p.detach().float().cpu().clone() for n, p in pl_module.named_parameters()}
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(weights, self.out / f"{name}-rank{trainer.global_rank}.pt")


def full_parameters(trainer: L.Trainer) -> Any:
    """A context in which the module's parameters are whole tensors (FSDP gathers its shards on every rank)."""
    from contextlib import nullcontext

    from torch.distributed.fsdp import FullyShardedDataParallel

    model = trainer.strategy.model
    if isinstance(model, FullyShardedDataParallel):
        return FullyShardedDataParallel.summon_full_params(model, writeback=False, rank0_only=False)
    return nullcontext()


# ---- comparing -----------------------------------------------------------------------------------------------------


@dataclass
class Cell:
    task: str
    setting: str
    status: str  # "pass", "FAIL", "n/a", "missing"
    note: str = ""
    measured: dict[str, float] = field(default_factory=dict)


def load_run(run: Path, resume: bool) -> dict[str, Any] | None:
    """Merge the ranks (and the two phases of a resume) of one cell into per-step values."""
    phases = ["first", "second"] if resume else [""]
    probes, weights = [], None
    for phase in phases:
        ranks = sorted(run.glob(f"probe{phase}-rank*.json"))
        if not ranks:
            return None
        probes.append([json.loads(p.read_text()) for p in ranks])
    last = phases[-1]
    rank_weights = [torch.load(p, weights_only=True) for p in sorted(run.glob(f"weights{last}-rank*.pt"))]
    weights = rank_weights[0]
    losses: dict[int, list[float]] = {}
    lr: dict[int, float] = {}
    grad_norm: dict[int, float] = {}
    for phase_probes in probes:
        for probe in phase_probes:
            for step, loss in probe["micro_losses"]:
                losses.setdefault(int(step), []).append(loss)
        lr.update({int(k): v for k, v in phase_probes[0]["lr"].items()})
        grad_norm.update({int(k): v for k, v in phase_probes[0]["grad_norm"].items()})
    ranks_apart = max((max_abs_diff(weights, w) for w in rank_weights[1:]), default=0.0)
    initial = run / "initial-rank0.pt"
    return {
        "loss": {s: sum(v) / len(v) for s, v in sorted(losses.items())},
        "lr": lr,
        "grad_norm": grad_norm,
        "weights": weights,
        "groups": probes[-1][0]["groups"],
        "world_size": probes[-1][0]["world_size"],
        "ranks_apart": ranks_apart,
        "initial": torch.load(initial, weights_only=True) if initial.is_file() else None,
        "param_dtype": probes[-1][0]["param_dtype"],
    }


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise ValueError(f"different parameters: {sorted(a.keys() ^ b.keys())[:5]}")
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def l2_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        raise ValueError(f"different parameters: {sorted(a.keys() ^ b.keys())[:5]}")
    return math.sqrt(sum(((a[k].double() - b[k].double()) ** 2).sum().item() for k in a))


def relative(values: dict[int, float], reference: dict[int, float]) -> float:
    if values.keys() != reference.keys():
        return math.inf
    return max((abs(values[s] - reference[s]) / max(abs(reference[s]), 1e-12) for s in reference), default=0.0)


def compare_cell(task: str, setting: Setting, out: Path, steps: int, initial: dict[str, torch.Tensor] | None) -> Cell:
    why = not_applicable(task, setting)
    if why:
        return Cell(task, setting.name, "n/a", why)
    ref, got = load_run(out / "reference" / task, False), load_run(out / setting.name / task, setting.resume)
    if ref is None or got is None:
        return Cell(task, setting.name, "missing", "the reference run is missing" if ref is None else "did not run")
    tol, problems = setting.tolerance, []
    expected_steps = list(range(steps))
    if list(got["loss"]) != expected_steps:
        problems.append(f"trained steps {list(got['loss'])}, expected {expected_steps}")
    if got["groups"] != ref["groups"]:
        problems.append("optimizer groups differ: " + describe_groups(got["groups"], ref["groups"]))
    if got["lr"] != ref["lr"]:
        problems.append(f"learning rates differ: {got['lr']} vs {ref['lr']}")
    if got["ranks_apart"] != 0.0:
        problems.append(f"ranks hold different weights (max |diff| {got['ranks_apart']:.3g})")
    if initial is not None and got["initial"] is not None:
        start = max_abs_diff(got["initial"], initial)
        bound = 2**-8 * max(v.abs().max().item() for v in initial.values()) if "bf16-true" in setting.name else 0.0
        if start > bound:
            problems.append(f"starts from other weights than the reference (max |diff| {start:.3g})")
    loss_error, norm_error = relative(got["loss"], ref["loss"]), relative(got["grad_norm"], ref["grad_norm"])
    update = l2_distance(ref["weights"], initial) if initial is not None else math.nan
    weight_error = l2_distance(got["weights"], ref["weights"]) / max(update, 1e-12)
    measured = {"loss": loss_error, "grad_norm": norm_error, "weights": weight_error, "update": update}
    for name, value, bound in (("loss", loss_error, tol.loss), ("grad norm", norm_error, tol.grad_norm),
                               ("weights", weight_error, tol.weights)):  # fmt: skip
        if not value <= bound:
            problems.append(f"{name} off by {value:.3g} relative (allowed {bound:g})")
    return Cell(task, setting.name, "FAIL" if problems else "pass", "; ".join(problems), measured)


def describe_groups(got: list, ref: list) -> str:
    parts = []
    for (wd, names), (ref_wd, ref_names) in zip(got, ref):
        moved = sorted(set(names) ^ set(ref_names))
        parts.append(f"decay {wd}: {len(names)} parameters (reference {len(ref_names)} at {ref_wd}), e.g. {moved[:3]}")
    return "; ".join(parts)


def compare(out: Path, settings: list[Setting], tasks: list[str], steps: int) -> list[Cell]:
    cells = []
    for task in tasks:
        init = out / "reference" / task / "initial-rank0.pt"
        initial = torch.load(init, weights_only=True) if init.is_file() else None
        cells += [compare_cell(task, s, out, steps, initial) for s in settings]
    return cells


def table(cells: list[Cell], settings: list[Setting]) -> str:
    lines = ["| task | setting | result | loss (rel.) | grad norm (rel.) | weights (L2, rel. to update) | tolerance |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    by_name = {s.name: s for s in settings}
    for c in cells:
        m = c.measured
        tol = by_name[c.setting].tolerance
        numbers = [f"{m['loss']:.1e}", f"{m['grad_norm']:.1e}", f"{m['weights']:.1e}"] if m else ["", "", ""]
        note = f" ({c.note})" if c.note else ""
        lines.append(f"| {c.task} | {c.setting} | {c.status}{note} | " + " | ".join(numbers)
                     + f" | {tol.loss:g} / {tol.grad_norm:g} / {tol.weights:g} |")  # fmt: skip
    return "\n".join(lines)


# ---- the whole matrix ----------------------------------------------------------------------------------------------


def matrix(out: Path, settings: list[Setting], tasks: list[str], accelerator: str, steps: int,
           timeout: int = 900, env: dict[str, str] | None = None) -> dict[str, str]:  # fmt: skip
    """Run the reference and every setting, each as its own process (`env`: variables to add); returns the
    settings that failed to run, with the end of their output."""
    failures: dict[str, str] = {}
    # One thread per process: the 2-process settings would otherwise oversubscribe a small machine's cores.
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1", **(env or {})}
    for setting in [REFERENCE, *settings]:
        cmd = [sys.executable, "-m", "polyformer.parity", "run", "--setting", setting.name, "--out", str(out),
               "--accelerator", accelerator, "--steps", str(steps), "--tasks", *tasks]  # fmt: skip
        start = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        took = time.time() - start
        (out / setting.name).mkdir(parents=True, exist_ok=True)
        (out / setting.name / "log.txt").write_text(f"{' '.join(cmd)}\n{took:.1f} s\n{proc.stdout}\n{proc.stderr}")
        if proc.returncode != 0:
            failures[setting.name] = (proc.stdout[-2000:] + proc.stderr[-6000:]).strip()
    return failures


def all_settings(extra: list[str] | None = None) -> list[Setting]:
    return [*SETTINGS.values(), *(GPU_ONLY[name] for name in extra or [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m polyformer.parity", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "compare", "matrix"):
        p = sub.add_parser(name)
        p.add_argument("--out", type=Path, required=True)
        p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
        p.add_argument("--steps", type=int, default=STEPS)
        p.add_argument("--accelerator", default="cpu")
        p.add_argument("--extra", nargs="*", default=[], choices=list(GPU_ONLY), help="GPU-only settings to add")
        if name != "run":
            p.add_argument("--settings", nargs="+", choices=list(SETTINGS), help="only these (default: all)")
        if name == "run":
            p.add_argument("--setting", required=True, choices=["reference", *SETTINGS, *GPU_ONLY])
    args = parser.parse_args(argv)
    settings = all_settings(args.extra)
    if getattr(args, "settings", None):
        settings = [s for s in settings if s.name in args.settings or s.name in args.extra]
    if args.command == "run":
        setting = {"reference": REFERENCE, **SETTINGS, **GPU_ONLY}[args.setting]
        run_setting(setting, args.out, args.tasks, args.accelerator, args.steps)
        return 0
    if args.command == "matrix":
        failures = matrix(args.out, settings, args.tasks, args.accelerator, args.steps)
        for name, text in failures.items():
            print(f"== {name} did not run ==\n{text}\n")
    cells = compare(args.out, settings, args.tasks, args.steps)
    print(table(cells, settings))
    return int(any(c.status in ("FAIL", "missing") for c in cells))


if __name__ == "__main__":
    sys.exit(main())
