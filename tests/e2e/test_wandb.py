"""The W&B logger preset as a user runs it: `polyformer fit --config <task> --config configs/logger/wandb.yaml`, with
no credentials and no network (the server URL is a closed loopback port). Runs are read back from their files."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import ROOT, run_cli
from wandb_reader import offline_runs, read_run


def clip_fit(tmp_path: Path, steps: int, *extra: str, stdin: int | None = None) -> subprocess.CompletedProcess:
    args = [
        "fit", "--config", str(ROOT / "configs/clip/digits.yaml"), "--config", str(ROOT / "configs/logger/wandb.yaml"),
        f"--trainer.max_steps={steps}", "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1",
        "--trainer.log_every_n_steps=1", "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false",
        "--trainer.logger.init_args.tags=[test]", "--trainer.logger.init_args.group=e2e", *extra,
    ]  # fmt: skip
    if stdin is None:
        return run_cli(args, cwd=tmp_path, timeout=300)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "polyformer", *args],
        cwd=tmp_path, env=env, stdin=stdin, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    """No API key, no netrc, no WANDB_MODE: the logger must decide on its own to go offline."""
    # WANDB_SERVICE: an earlier in-process run's wandb-core address, which a CLI subprocess would otherwise join.
    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "NETRC", "WANDB_SERVICE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("POLYFORMER_CACHE", str(tmp_path / "cache"))


@pytest.mark.slow
def test_offline_run_without_credentials_then_resume_continues_it(tmp_path, no_credentials):
    # stdin is a terminal, where wandb would ask for an API key if it tried to log in: it must not try.
    leader, follower = pty.openpty()
    try:
        first = clip_fit(tmp_path, 2, stdin=follower)
    finally:
        os.close(leader)
        os.close(follower)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "API key" not in first.stdout + first.stderr
    runs = tmp_path / "runs" / "clip-digits"  # the preset's default_root_dir: one run directory per fit
    (run_dir,) = offline_runs(runs / "version_0")
    # said exactly once, with the folder and the command to upload it
    message = f"upload it with: wandb sync {run_dir.resolve()}"
    assert first.stderr.count(message) == 1, first.stderr[-3000:]
    assert first.stderr.count("no W&B credentials found") == 1

    run = read_run(run_dir)
    keys = run.metric_keys()
    assert {"train/loss", "val/loss", "val/zero_shot_top1", "train/grad_norm", "memory/peak_rss_gb"} <= keys, keys
    assert any(k.startswith("lr-AdamW") for k in keys)
    assert [s for s, _ in run.values("train/loss")] == [0, 1]
    assert [s for s, _ in run.values("val/zero_shot_top1")] == [1]  # after step 2 = global_step 2 - 1 logged
    for kind, key in [("images", "media/similarity"), ("table", "media/zero_shot_per_class"),
                      ("table", "media/retrieval"), ("images", "media/attention_overlay"),
                      ("images", "media/attention/text.encoder/attn")]:  # fmt: skip
        assert run.media(kind, key), key
    per_class = json.loads(run.media("table", "media/zero_shot_per_class")[0].read_text())
    assert len(per_class["data"]) == 10
    # the full resolved config (what --print_config prints) is the run's config
    assert run.config["model"]["class_path"] == "polyformer.tasks.contrastive.CLIP"
    assert run.config["trainer"]["logger"]["init_args"]["tags"] == ["test"]
    assert run.config["data"]["init_args"]["source"] == "digits"

    ckpt_path = runs / "version_0" / "checkpoints" / "last.ckpt"
    ckpt = torch.load(ckpt_path, weights_only=True)  # plain values only
    assert ckpt["wandb"]["run_id"] == run.id
    assert ckpt["config"]["model"]["init_args"]["embed_dim"] == 64

    second = clip_fit(tmp_path, 4, f"--ckpt_path={ckpt_path}")
    assert second.returncode == 0, second.stderr[-3000:]
    (resumed_dir,) = offline_runs(runs / "version_1")  # the resumed fit has a run directory of its own
    resumed = read_run(resumed_dir)
    assert resumed.id == run.id  # the same W&B run continues (wandb sync merges both folders into it)
    assert [s for s, _ in resumed.values("train/loss")] == [2, 3]
    assert sorted(p.name for p in (runs / "version_1" / "checkpoints").glob("*.ckpt")) == [
        "epoch=0-step=4.ckpt",
        "last.ckpt",
    ]
    assert (runs / "latest").resolve() == (runs / "version_1").resolve()


def test_wandb_disabled_writes_nothing(tmp_path, no_credentials, monkeypatch, capfd):
    import lightning as L
    import wandb

    from polyformer.callbacks.media import TaskMedia
    from polyformer.loggers import RunMetadata, WandbLogger

    monkeypatch.setenv("WANDB_MODE", "disabled")
    trainer = L.Trainer(
        max_steps=2, val_check_interval=2, limit_val_batches=1, num_sanity_val_steps=0, log_every_n_steps=1,
        logger=WandbLogger(save_dir=str(tmp_path)), callbacks=[RunMetadata(), TaskMedia()], default_root_dir=tmp_path,
        accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(*tiny_clip())
    wandb.finish()
    wandb.teardown()
    assert trainer.global_step == 2
    assert offline_runs(tmp_path) == [] and not (tmp_path / "wandb").exists()
    assert "wandb sync" not in capfd.readouterr().err


@pytest.mark.slow
def test_ddp_two_ranks_one_run_media_from_rank_zero(tmp_path, no_credentials):
    """Two CPU ranks: one W&B run, media logged once, no hang from rank-0-only work."""
    result = clip_fit(tmp_path, 2, "--trainer.strategy=ddp", "--trainer.devices=2")
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = offline_runs(tmp_path / "runs" / "clip-digits" / "version_0")  # one directory for both ranks
    assert result.stderr.count("no W&B credentials found") == 1
    run = read_run(run_dir)
    assert [s for s, _ in run.values("train/loss")] == [0, 1]
    assert len(run.media("images", "media/similarity")) == 1
    assert len(run.media("table", "media/retrieval")) == 1


def tiny_clip():
    from polyformer.backbone import TransformerConfig
    from polyformer.data.image_text import ImageTextData
    from polyformer.tasks.contrastive import CLIP, ImageEncoderConfig, TextEncoderConfig

    small = dict(width=32, depth=1, heads=2, dropout=0.0)
    model = CLIP(
        ImageEncoderConfig(TransformerConfig(**small, position="none"), image_size=8, patch_size=4, channels=1),
        TextEncoderConfig(TransformerConfig(**small, position="learned", max_len=32, causal=True)),
        embed_dim=16,
    )
    return model, ImageTextData(batch_size=32, eval_batch_size=64, context_length=32, channels=1)


@pytest.mark.slow
def test_requeued_job_continues_the_run_of_its_hpc_checkpoint(tmp_path, monkeypatch):
    """The SLURM requeue path: Lightning resumes from <default_root_dir>/hpc_ckpt_N.ckpt by itself, and the W&B
    logger, created before that checkpoint is read, must still continue the checkpoint's run."""
    import lightning as L
    import wandb

    from polyformer.loggers import RunMetadata, WandbLogger

    monkeypatch.setenv("POLYFORMER_CACHE", str(tmp_path / "cache"))

    def trainer(steps):
        logger = WandbLogger(save_dir=str(tmp_path), offline=True)
        return L.Trainer(
            max_steps=steps, limit_val_batches=0, logger=logger, callbacks=[RunMetadata()], default_root_dir=tmp_path,
            accelerator="cpu", devices=1, enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1,
        )  # fmt: skip

    first = trainer(1)
    first.fit(*tiny_clip())
    first.save_checkpoint(tmp_path / "hpc_ckpt_1.ckpt")  # what Lightning's SIGUSR1 handler writes before requeueing
    run_id = first.logger.version
    wandb.finish()

    second = trainer(2)
    assert second.logger.version != run_id  # a fresh logger picks a new id until the checkpoint says otherwise
    second.fit(*tiny_clip(), ckpt_path="hpc")
    assert second.logger.version == run_id
    assert second.logger.experiment.id == run_id
    wandb.finish()
    wandb.teardown()
    ids = sorted(read_run(r).id for r in offline_runs(tmp_path))
    assert ids == [run_id, run_id]
    assert [s for s, _ in read_run(offline_runs(tmp_path)[-1]).values("train/loss")] == [1]


def test_offline_keeps_log_model_for_wandb_sync(recwarn):
    from polyformer.loggers import WandbLogger

    logger = WandbLogger(offline=True, log_model=True)  # recorded offline: tests/e2e/test_wandb_artifacts.py
    assert logger._log_model is True and not [w for w in recwarn if "log_model" in str(w.message)]


def test_auto_offline_only_without_credentials(tmp_path, monkeypatch):
    from polyformer.loggers import WandbLogger, has_wandb_credentials

    for var in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not has_wandb_credentials()
    assert WandbLogger()._wandb_init["mode"] == "offline"
    (tmp_path / "netrc").write_text("machine 127.0.0.1\n  login user\n  password abc\n")
    assert has_wandb_credentials()  # WANDB_BASE_URL is http://127.0.0.1:9 in the tests
    assert WandbLogger()._wandb_init["mode"] == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert WandbLogger()._wandb_init["mode"] == "disabled"
    assert WandbLogger(offline=True)._wandb_init["mode"] == "disabled"  # disabled stays disabled
