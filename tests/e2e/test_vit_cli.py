"""The ViT as a user runs it: `polyformer fit` on the digits preset and on an image folder, then `polyformer test`
and `polyformer classify` on the checkpoint (subprocesses, like a shell)."""

import csv
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, run_cli
from PIL import Image

DIGITS = str(ROOT / "configs" / "vit" / "digits.yaml")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # tiny models on a shared 2-core machine: threads only contend


def last_metrics(root: Path) -> dict[str, float]:
    """The last logged value of each metric in the CSV logger's metrics.csv under root."""
    (path,) = root.rglob("metrics.csv")
    values: dict[str, float] = {}
    with path.open() as f:
        for row in csv.DictReader(f):
            values.update({k: float(v) for k, v in row.items() if v not in ("", None)})
    return values


def csv_logger(root: Path) -> list[str]:
    return ["--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}"]


@pytest.mark.slow
def test_digits_preset_fit_test_and_classify(tmp_path):
    fit = run_cli(
        [
            "fit", "--config", DIGITS, "--trainer.max_epochs=8", "--trainer.check_val_every_n_epoch=4",
            f"--trainer.default_root_dir={tmp_path}",
            *csv_logger(tmp_path),
        ],
        tmp_path, env=ONE_THREAD,
    )  # fmt: skip
    assert fit.returncode == 0, fit.stderr[-3000:]
    metrics = last_metrics(tmp_path)
    assert metrics["val/top1"] > 0.5, metrics  # chance is 0.1
    assert "Run summary" in fit.stdout
    (ckpt,) = tmp_path.rglob("last.ckpt")  # under the CSV logger's version folder

    test = run_cli(
        ["test", "--config", DIGITS, f"--ckpt_path={ckpt}", "--trainer.logger=false"], tmp_path, env=ONE_THREAD
    )
    assert test.returncode == 0, test.stderr[-3000:]
    assert "test/top1" in test.stdout

    # Three test digits written as PNGs of other sizes and modes: classify converts and resizes them.
    from polyformer.data.digits import DIGIT_NAMES, load_digits_split

    images, labels = load_digits_split("test")
    files = []
    for i, mode in enumerate(["L", "RGB", "RGBA"]):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(images[i, 0].numpy()).resize((32, 32), Image.NEAREST).convert(mode).save(path)
        files.append(path)
    out = run_cli(["classify", "--ckpt", str(ckpt), *map(str, files), "--top", "3"], tmp_path, env=ONE_THREAD)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith(str(f)) for line, f in zip(lines, files))
    for line in lines:
        predictions = line.split(": ", 1)[1].split(", ")
        assert len(predictions) == 3 and all(p.split()[0] in DIGIT_NAMES for p in predictions)

    bad = run_cli(["classify", "--ckpt", str(ckpt), str(tmp_path / "missing.png")], tmp_path)
    assert bad.returncode == 1 and "image file(s) not found" in bad.stderr and "missing.png" in bad.stderr


@pytest.mark.slow
def test_an_image_folder_of_generated_pngs_trains(tmp_path):
    """Two classes told apart by whether the top or the bottom half is bright (horizontal flips keep the class);
    one file is corrupt and gets skipped."""
    rng = np.random.default_rng(0)
    root = tmp_path / "folder"
    for label, name in enumerate(["top", "bottom"]):
        (root / name).mkdir(parents=True)
        for i in range(40):
            pixels = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
            pixels[:8] += 150 if label == 0 else 0
            pixels[8:] += 150 if label == 1 else 0
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    (root / "top" / "broken.png").write_bytes(b"\x89PNG not really")
    result = run_cli(
        [
            "fit",
            "--model=polyformer.tasks.image_classification.ImageClassifier",
            "--model.backbone.width=32", "--model.backbone.depth=2", "--model.backbone.heads=2",
            "--model.backbone.dropout=0.0", "--model.patch_size=4", "--model.optimizer.lr=3e-3",
            "--model.optimizer.warmup_steps=5",
            "--data=polyformer.data.images.ImageDataModule", "--data.dataset=folder", f"--data.root={root}",
            "--data.image_size=16", "--data.batch_size=8", "--data.val_fraction=0.25",
            "--data.augment.crop_scale=[1.0,1.0]",
            "--trainer.max_epochs=15", "--trainer.accelerator=cpu", "--trainer.enable_checkpointing=false",
            f"--trainer.default_root_dir={tmp_path}", *csv_logger(tmp_path),
        ],
        tmp_path, env={**ONE_THREAD, "PYTHONWARNINGS": "ignore,default:skipped unreadable image"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipped unreadable image" in result.stderr and "broken.png" in result.stderr
    metrics = last_metrics(tmp_path)
    assert metrics["val/top1"] >= 0.9, metrics  # chance is 0.5


def test_missing_image_folder_is_one_clear_cli_error(tmp_path):
    result = run_cli(
        [
            "fit", "--model=polyformer.tasks.image_classification.ImageClassifier",
            "--data=polyformer.data.images.ImageDataModule", "--data.dataset=folder",
            f"--data.root={tmp_path / 'nowhere'}", "--trainer.accelerator=cpu", "--trainer.max_steps=1",
        ],
        tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "image folder not found" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_fit_from_timm_weights_in_a_local_file(tmp_path):
    """`--model.init_from=timm:<name>@<file>` through the CLI: timm adapts its weights to the digits (one channel,
    positions for 32x32), and the checkpoint carries them: it loads after the file is gone."""
    import timm
    import torch

    from polyformer.checkpointing.loading import load_task

    torch.manual_seed(0)
    theirs = timm.create_model("test_vit", pretrained=False)  # 3 channels, 160x160, 1000 classes
    weights = tmp_path / "test_vit.pth"
    torch.save(theirs.state_dict(), weights)
    result = run_cli(
        [
            "fit", "--config", DIGITS, f"--model.init_from=timm:test_vit@{weights}",
            "--model.backbone.width=64", "--model.backbone.depth=6", "--model.backbone.heads=2",
            "--model.backbone.mlp_ratio=3.0", "--model.patch_size=16", "--data.image_size=32",
            "--model.optimizer.lr=1e-12",  # one step that leaves the weights as loaded
            "--trainer.max_steps=1", "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.logger=false",
        ],
        tmp_path, env=ONE_THREAD,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (ckpt,) = tmp_path.rglob("last.ckpt")
    stored = torch.load(ckpt, weights_only=True)["polyformer"]["hyper_parameters"]
    assert stored["init_from"] == f"timm:test_vit@{weights}"  # where the run started, on record
    weights.unlink()  # the checkpoint's own weights replace init_from, which is not read again
    task = load_task(ckpt)
    fc2 = theirs.blocks[5].mlp.fc2.weight
    torch.testing.assert_close(task.model.tower.encoder.blocks[5].mlp.fc2.weight, fc2, rtol=0, atol=1e-6)
    # One input channel: timm sums the RGB filters of the patch projection.
    patch = theirs.patch_embed.proj.weight.sum(dim=1, keepdim=True)
    torch.testing.assert_close(task.model.tower.patch.proj.weight, patch, rtol=0, atol=1e-5)
