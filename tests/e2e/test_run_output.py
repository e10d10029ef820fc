"""What a run shows and where it writes, as a user meets it: `polyformer fit` in a fresh directory.

One rule for every preset and logger: `<trainer.default_root_dir>/version_N` holds the run's config, checkpoints and
logs, `latest` points at the newest fit, and the header printed before the first step says so. The terminal shows
the task, its size (tied weights once), the work per step and a progress bar in optimizer steps, and none of
Lightning's noise (an advertisement, a deprecation warning, a FLOPs column of zeros, "Epoch 0/-2").
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers import ROOT, TINY_LM_ARGS, run_cli
from rich.console import Console

from polyformer.backbone.config import TransformerConfig
from polyformer.callbacks.progress import StepProgressBar
from polyformer.callbacks.run_summary import millions, parameter_counts
from polyformer.checkpointing import load_task
from polyformer.checkpointing.files import read_checkpoint
from polyformer.models.gpt import GPT, GPTConfig

TINY = str(ROOT / "configs" / "lm" / "tiny.yaml")
SMALL = [*TINY_LM_ARGS, "--trainer.max_steps=4", "--trainer.val_check_interval=2"]
NOISE = ["litlogger", "LeafSpec", "FLOPs", "Epoch 0/-", "GPU available", "Total params"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> dict[str, str]:
    # One tokenizer cache for the module: the BPE is trained once. Warnings as a user sees them (run_cli hides them).
    return {"POLYFORMER_CACHE": str(tmp_path_factory.mktemp("cache")), "PYTHONWARNINGS": "default",
            "OMP_NUM_THREADS": "1"}  # fmt: skip


def fit(tmp_path: Path, env: dict[str, str], *extra: str):
    result = run_cli(["fit", "--config", TINY, *SMALL, *extra], cwd=tmp_path, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_fit_prints_the_header_a_step_bar_and_writes_one_run_directory(tmp_path, cache):
    first = fit(tmp_path, cache)
    out = first.stdout + first.stderr
    for noise in NOISE:
        assert noise not in out, f"{noise!r} in the output:\n{out[-3000:]}"
    root = tmp_path / "runs" / "lm-tiny"
    run0 = root / "version_0"
    assert {p.name for p in run0.iterdir()} >= {"config.yaml", "checkpoints", "hparams.yaml"}
    assert list(run0.glob("events.out.tfevents.*")) and (run0 / "checkpoints" / "last.ckpt").is_file()
    assert not (root / "lightning_logs").exists() and not (tmp_path / "lightning_logs").exists()

    # The header: parameters counted once (the head is tied to the token embedding), tokens per optimizer step.
    model = load_task(run0 / "checkpoints" / "last.ckpt").model
    unique = sum(p.numel() for p in model.parameters())
    tied = model.embed.weight.numel()
    assert model.head.weight is model.embed.weight
    assert f"LanguageModel (GPT): {millions(unique)} parameters (" in first.stdout, first.stdout[:2000]
    assert f"{millions(tied)} shared (tied), counted once" in first.stdout
    assert f"per step: {4 * 17:,} tokens (4 x 17 per device)" in first.stdout  # 16 inputs + the shifted target
    assert "run directory: runs/lm-tiny/version_0 (runs/lm-tiny/latest points here)" in first.stdout
    # Not a terminal: plain progress lines in optimizer steps, with the run's total, throughput and the task's metrics.
    steps = re.findall(r"^step (\d)/4 .*tok/s.*train/loss", first.stdout, flags=re.M)
    assert steps and steps[-1] == "4", first.stdout
    assert "Run summary:" in first.stdout
    # and each validation's metrics on a line of their own (the last one comes after the last step's line)
    assert re.findall(r"^validation at step (\d) · val/loss [\d.]+", first.stdout, flags=re.M) == ["2", "4"]

    second = fit(tmp_path, cache)
    assert "run directory: runs/lm-tiny/version_1" in second.stdout
    assert (root / "latest").resolve() == (root / "version_1").resolve()
    assert (root / "version_1" / "checkpoints" / "last.ckpt").is_file()
    # A fit refused before training (a checkpoint of another width) leaves `latest` on the last run that trained.
    refused = run_cli(["fit", "--config", TINY, *SMALL, "--model.init_args.backbone.width=48",
                       "--ckpt_path=runs/lm-tiny/latest/checkpoints/last.ckpt"], cwd=tmp_path, env=cache)  # fmt: skip
    assert refused.returncode == 1 and "width" in refused.stderr, refused.stderr[-2000:]
    assert (root / "latest").resolve() == (root / "version_1").resolve()
    # A checkpoint named through `latest` is the one of the run it named when the command started, not the new run's.
    resumed = fit(tmp_path, cache, "--trainer.max_steps=6", "--ckpt_path=runs/lm-tiny/latest/checkpoints/last.ckpt")
    assert "run directory: runs/lm-tiny/version_3" in resumed.stdout
    assert read_checkpoint(root / "version_3" / "checkpoints" / "last.ckpt")["global_step"] == 6  # 4 + 2 resumed
    assert (root / "latest").resolve() == (root / "version_3").resolve()


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["csv", "wandb", "none"])
def test_every_logger_writes_into_the_run_directory(tmp_path, cache, logger):
    extra = {"csv": ["--config", str(ROOT / "configs" / "logger" / "csv.yaml")],
             "wandb": ["--config", str(ROOT / "configs" / "logger" / "wandb.yaml")],
             "none": ["--trainer.logger=false"]}[logger]  # fmt: skip
    env = {**cache, "WANDB_MODE": "offline", "WANDB_DIR": "", "WANDB_SILENT": "true"}
    result = fit(tmp_path, env, *extra, "--trainer.default_root_dir=out/exp")
    run = tmp_path / "out" / "exp" / "version_0"
    assert "run directory: out/exp/version_0" in result.stdout
    assert {p.name for p in (tmp_path / "out" / "exp").iterdir()} == {"version_0", "latest"}
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    if logger == "csv":
        assert (run / "metrics.csv").is_file()
    if logger == "wandb":
        (wandb_run,) = (run / "wandb").glob("offline-run-*")
        assert list(wandb_run.glob("run-*.wandb"))
    assert sorted(p.relative_to(tmp_path).parts[0] for p in tmp_path.iterdir()) == ["out"]  # nothing else in cwd


@pytest.mark.slow
def test_ddp_ranks_share_one_run_directory(tmp_path, cache):
    # W&B first: the directory comes from rank 0's next free version_N, broadcast; the other rank must not make its own.
    env = {**cache, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    result = fit(tmp_path, env, "--config", str(ROOT / "configs" / "trainer" / "ddp-cpu.yaml"),
                 "--config", str(ROOT / "configs" / "logger" / "wandb.yaml"))  # fmt: skip
    root = tmp_path / "runs" / "lm-tiny"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "version_0"], result.stdout
    assert (root / "version_0" / "checkpoints" / "last.ckpt").is_file()
    assert len(list((root / "version_0" / "wandb").glob("offline-run-*"))) == 1
    assert "per step: 136 tokens (4 x 17 per device, x 2 devices)" in result.stdout


def test_parameter_count_takes_a_tied_head_once():
    model = GPT(
        GPTConfig(TransformerConfig(width=32, depth=2, heads=2, max_len=16, causal=True, position="learned"), 50)
    )
    total, embedding, shared = parameter_counts(model, strategy=None)
    assert total == sum(p.numel() for p in model.parameters())
    assert total == sum(p.numel() for p in model.state_dict().values()) - model.head.weight.numel()
    assert embedding == 64 * 32 + 16 * 32 and shared == 64 * 32  # the vocabulary padded to 64 rows
    untied = GPT(GPTConfig(TransformerConfig(width=32, depth=2, heads=2, max_len=16, causal=True), 50, False))
    assert parameter_counts(untied, strategy=None)[2] == 0


class _Steps(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        loss = self.layer(batch.float()).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_terminal_bar_counts_optimizer_steps_across_epochs(tmp_path, monkeypatch):
    """In a terminal: one bar over the run's optimizer steps (not batches of one epoch), with tokens/s and the loss."""
    buffer = io.StringIO()
    bar = StepProgressBar()
    monkeypatch.setattr(StepProgressBar, "interactive", property(lambda self: True))
    monkeypatch.setattr(bar, "_make_console", lambda: Console(file=buffer, force_terminal=True, width=160))
    data = torch.utils.data.DataLoader(torch.randint(0, 9, (12, 4)), batch_size=4)  # 3 batches an epoch, 16 tokens each
    trainer = L.Trainer(max_steps=7, callbacks=[bar], logger=False, enable_checkpointing=False,
                        enable_model_summary=False, default_root_dir=tmp_path)  # fmt: skip
    trainer.fit(_Steps(), data)
    screen = buffer.getvalue()
    assert "7/7" in screen and "fit" in screen and "train/loss" in screen
    assert "Epoch" not in screen and os.linesep + "3/3" not in screen
