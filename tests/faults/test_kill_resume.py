"""SIGKILL a real training run, resume it from `last.ckpt`, finish: nothing is corrupt and at most the steps since
the last checkpoint are lost (the resumed run starts exactly at the checkpoint's step)."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from polyformer.checkpointing.files import CheckpointError, read_checkpoint

EVERY = 5  # checkpoint interval (optimizer steps)


def checkpointing(every: int) -> list[dict]:
    return [
        {
            "class_path": "polyformer.checkpointing.ResumableCheckpoint",
            "init_args": {"dirpath": "ckpts", "every_n_train_steps": every, "save_last": True},
        }
    ]


def csv_logger(version: str) -> dict:
    return {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "logs", "version": version}}


@pytest.mark.slow
def test_sigkill_mid_training_then_resume_and_finish(tiny_lm_config, cli_env, tmp_path):
    config = tiny_lm_config(
        **{
            "trainer.max_steps": 100_000,  # never ends by itself: it is killed
            "trainer.callbacks": checkpointing(EVERY),
            "trainer.log_every_n_steps": 1,
        }
    )
    last = tmp_path / "ckpts" / "last.ckpt"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", **cli_env}
    proc = subprocess.Popen(
        [sys.executable, "-m", "polyformer", "fit", "--config", str(config)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 240
        step = 0
        while step < 2 * EVERY and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
            try:  # reading while the run writes is safe: the file is replaced whole or not at all
                step = read_checkpoint(last)["global_step"] if last.exists() else 0
            except CheckpointError as e:
                pytest.fail(f"last.ckpt was readable-but-corrupt while training: {e}")
        assert proc.poll() is None, proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL

    saved = read_checkpoint(last)  # whole and loadable after the kill
    killed_at = saved["global_step"]
    assert killed_at >= 2 * EVERY and killed_at % EVERY == 0

    finish = killed_at + 3
    result = subprocess.run(
        [sys.executable, "-m", "polyformer", "fit", "--config", str(config), "--ckpt_path", str(last)]
        + [f"--trainer.max_steps={finish}", f"--trainer.logger={_yaml(csv_logger('resumed'))}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    resumed = _logged_steps(tmp_path / "logs" / "lightning_logs" / "resumed" / "metrics.csv")
    assert min(resumed) == killed_at  # picked up exactly at the checkpoint: only later steps were redone
    assert max(resumed) == finish - 1
    assert read_checkpoint(last)["global_step"] == finish


def _logged_steps(path) -> list[int]:
    with open(path) as f:
        return [int(row["step"]) for row in csv.DictReader(f) if row.get("train/loss")]


def _yaml(value: dict) -> str:
    import json

    return json.dumps(value)  # JSON is YAML, and jsonargparse parses it as the option's value
