"""BERT as a user runs it: `polyformer fit --config configs/bert/tiny-mlm.yaml` (made tiny), then
`configs/bert/tiny-classify.yaml` fine-tuning from that run's last.ckpt through the `latest` link, as the preset
says; the classifier's metrics, confusion matrix and the tokenizer check of the checkpoint come along."""

import csv
from pathlib import Path

import pytest
from helpers import ROOT, run_cli

MLM = str(ROOT / "configs" / "bert" / "tiny-mlm.yaml")
CLASSIFY = str(ROOT / "configs" / "bert" / "tiny-classify.yaml")
M, D = "--model.init_args", "--data.init_args"
TINY = [f"{M}.backbone.width=32", f"{M}.backbone.depth=1", f"{M}.backbone.heads=2", f"{M}.backbone.max_len=32",
        f"{D}.bpe_vocab_size=512", "--trainer.max_steps=4", "--trainer.val_check_interval=2",
        "--trainer.limit_val_batches=2"]  # fmt: skip
CSV = ["--trainer.logger=CSVLogger", "--trainer.logger.save_dir=logs-tune"]  # a logger's save_dir moves the run dir


@pytest.mark.slow
def test_pretrain_then_fine_tune_from_the_checkpoint(tmp_path):
    env = {"POLYFORMER_CACHE": str(tmp_path / "cache")}
    fit = run_cli(["fit", "--config", MLM, *TINY, f"{D}.block_size=32"], cwd=tmp_path, env=env, timeout=900)
    assert fit.returncode == 0, fit.stderr[-3000:]
    ckpt = tmp_path / "runs/bert-tiny-mlm/latest/checkpoints/last.ckpt"
    assert ckpt.is_file()
    tune = run_cli(["fit", "--config", CLASSIFY, *TINY, f"{D}.max_length=32", *CSV],
                   cwd=tmp_path, env=env, timeout=900)  # fmt: skip
    assert tune.returncode == 0, tune.stderr[-3000:]
    with open(next(Path(tmp_path, "logs-tune").rglob("metrics.csv"))) as f:
        rows = list(csv.DictReader(f))
    accuracy = [float(r["val/accuracy"]) for r in rows if r.get("val/accuracy")]
    assert len(accuracy) == 2 and all(0.0 <= a <= 1.0 for a in accuracy)
    assert any(r.get("val/f1") for r in rows)
    # Another BPE than the checkpoint's: the fine-tuning refuses it, naming the setting.
    other = run_cli(["fit", "--config", CLASSIFY, *TINY, f"{D}.max_length=32", f"{D}.bpe_vocab_size=600"],
                    cwd=tmp_path, env=env, timeout=900)  # fmt: skip
    assert other.returncode != 0 and "vocab" in other.stderr[-2000:]
