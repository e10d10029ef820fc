"""The translation preset as a user runs it: `polyformer fit` on tiny.yaml raises BLEU, `translate` uses the
checkpoint alone, and 1-process and 2-process (DDP) validation give the same corpus BLEU."""

import csv
import re
from pathlib import Path

import pytest
from helpers import ROOT, run_cli

TINY = str(ROOT / "configs" / "translation" / "tiny.yaml")
ENV = {"OMP_NUM_THREADS": "1"}  # the test machine is shared: 2 threads per process oversubscribe it badly
FAST = [
    "--data.train_size=4000",
    "--data.val_size=64",
    "--model.decoding.beam_size=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.num_sanity_val_steps=0",
]


@pytest.fixture(scope="module")
def fitted(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("tiny")
    args = ["fit", "--config", TINY, *FAST, "--trainer.max_steps=360", "--trainer.val_check_interval=120",
            "--config", str(ROOT / "configs" / "logger" / "csv.yaml")]  # fmt: skip
    result = run_cli(args, tmp, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


@pytest.mark.slow
def test_fit_raises_bleu(fitted):
    (metrics,) = (fitted / "runs/translation-tiny").glob("version_0/metrics.csv")
    bleu = [float(r["val/bleu"]) for r in csv.DictReader(metrics.open()) if r.get("val/bleu")]
    assert len(bleu) == 3
    assert bleu[-1] > bleu[0] + 5, bleu
    # The preset's header names `latest`: it points at the run directory of this fit.
    assert (fitted / "runs/translation-tiny/latest").resolve() == (fitted / "runs/translation-tiny/version_0").resolve()
    assert (fitted / "runs/translation-tiny/latest/checkpoints/last.ckpt").is_file()


@pytest.mark.slow
def test_translate_verb_needs_only_the_checkpoint(fitted, tmp_path):
    ckpt = str(fitted / "runs/translation-tiny/latest/checkpoints/last.ckpt")
    lines = ["I counted seven birds.", "on May third, nineteen ninety-nine"]
    result = run_cli(["translate", "--ckpt", ckpt, *lines], tmp_path, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout.strip().splitlines()
    assert len(out) == 2 and all(out)
    (tmp_path / "in.txt").write_text("\n".join(lines))
    beam = run_cli(["translate", "--ckpt", ckpt, "--input", "in.txt", "--beam-size", "1"], tmp_path, env=ENV)
    assert beam.returncode == 0 and beam.stdout.strip().splitlines() == out  # the preset decodes greedily here


@pytest.mark.slow
def test_ddp_validation_agrees_with_one_process(fitted):
    ckpt = "runs/translation-tiny/latest/checkpoints/last.ckpt"
    scores = []
    for devices in ("1", "2"):
        extra = ["--trainer.strategy=ddp"] if devices == "2" else []
        result = run_cli(["validate", "--config", TINY, *FAST, "--ckpt_path", ckpt, f"--trainer.devices={devices}",
                          *extra], fitted, env=ENV)  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        found = re.findall(r"val: BLEU ([\d.]+) .* chrF ([\d.]+) .* on (\d+) sentences", result.stdout + result.stderr)
        assert found, result.stdout[-2000:]
        scores.append(found[-1])
    assert scores[0] == scores[1] and scores[0][2] == "64"  # every sentence once, same corpus score


def test_translate_bad_checkpoint_is_one_clear_line(tmp_path):
    result = run_cli(["translate", "--ckpt", "missing.ckpt", "hello"], tmp_path, env=ENV)
    assert result.returncode == 1
    assert "checkpoint not found: missing.ckpt" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_ddp_fit_with_length_buckets(tmp_path):
    # Two ranks train on disjoint, equally many length buckets; Lightning must keep our batch sampler.
    args = ["fit", "--config", TINY, *FAST, "--data.train_size=400", "--trainer.max_steps=4",
            "--trainer.limit_val_batches=1", "--trainer.val_check_interval=4", "--trainer.devices=2",
            "--trainer.strategy=ddp"]  # fmt: skip
    result = run_cli(args, tmp_path, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "runs/translation-tiny/latest/checkpoints/last.ckpt").is_file()
