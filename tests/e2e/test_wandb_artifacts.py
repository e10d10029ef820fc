"""Models as W&B artifacts: a fit with `log_model` and `polyformer export --log_model`, offline (no credentials), read
back from the run's own files. Offline runs keep the artifacts, so `wandb sync` uploads them later."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT, TINY_LM_ARGS, run_cli
from wandb_reader import read_run

TINY = str(ROOT / "configs" / "lm" / "tiny.yaml")
WANDB = str(ROOT / "configs" / "logger" / "wandb.yaml")
SMALL = [*TINY_LM_ARGS, "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--media.every_n_val=0"]


@pytest.mark.slow
def test_checkpoints_and_exports_are_logged_as_model_artifacts_of_the_training_run(tmp_path):
    env = {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "POLYFORMER_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    fit = run_cli(["fit", "--config", TINY, "--config", WANDB, *SMALL, "--trainer.logger.init_args.log_model=true"],
                  cwd=tmp_path, env=env)  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    run_dir = tmp_path / "runs" / "lm-tiny" / "version_0"
    (trained,) = (run_dir / "wandb").glob("offline-run-*")
    training = read_run(trained)
    saved = [a for a in training.artifacts if a["type"] == "model"]  # one version per checkpoint file
    assert {a["name"] for a in saved} == {f"model-{training.id}"} and any("best" in a["aliases"] for a in saved)
    assert all([c["path"] for c in a["manifest"]["contents"]] == ["model.ckpt"] for a in saved)
    originals = {json.loads(a["metadata"])["original_filename"] for a in saved}
    assert originals == {p.name for p in (run_dir / "checkpoints").glob("*.ckpt")}

    export = run_cli(["export", "--ckpt", str(run_dir / "checkpoints" / "last.ckpt"), "--format", "safetensors",
                      "--out", "exported", "--log_model"], cwd=tmp_path, env=env)  # fmt: skip
    assert export.returncode == 0, export.stderr[-3000:]
    assert "wandb sync" in export.stderr  # offline: says how to upload
    (exported,) = [r for r in (run_dir / "wandb").glob("offline-run-*") if r != trained]
    export_run = read_run(exported)
    assert export_run.id == training.id  # the artifact joins the run that trained the checkpoint
    (artifact,) = export_run.artifacts
    assert artifact["type"] == "model" and artifact["name"] == f"languagemodel-safetensors-{training.id}"
    files = sorted(c["path"] for c in artifact["manifest"]["contents"])
    assert files == sorted(p.name for p in (tmp_path / "exported").iterdir())
    assert "model.safetensors" in files and "config.json" in files


def test_export_log_model_refuses_disabled_wandb_in_one_line(tmp_path):
    ckpt = ROOT / "tests" / "fixtures" / "format1" / "lm.ckpt"
    result = run_cli(["export", "--ckpt", str(ckpt), "--format", "safetensors", "--out", "x", "--log_model"],
                     cwd=tmp_path, env={"WANDB_MODE": "disabled"})  # fmt: skip
    assert result.returncode == 1 and "WANDB_MODE=disabled" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()
