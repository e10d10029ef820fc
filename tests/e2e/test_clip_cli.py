"""The CLIP preset as a user runs it: `polyformer fit --config configs/clip/digits.yaml` (shortened), then
`polyformer test` and `polyformer score` on the checkpoint, in subprocesses."""

import json
import re

import numpy as np
import pytest
import yaml
from helpers import ROOT, run_cli
from PIL import Image

from polyformer.data.digits import DIGIT_NAMES, load_digits_split

THREADS = {"OMP_NUM_THREADS": "1"}  # a tiny model: one thread beats two contending ones on a busy 2-core machine


@pytest.mark.slow  # 120 optimizer steps on CPU: ~80% zero-shot top-1 (400 steps in the preset: ~95%)
def test_digits_fit_raises_zero_shot_well_above_chance_then_score(tmp_path):
    args = [
        "fit", "--config", str(ROOT / "configs/clip/digits.yaml"), "--trainer.max_steps=120",
        "--trainer.val_check_interval=120", f"--trainer.default_root_dir={tmp_path}",
        "--trainer.enable_progress_bar=false", "--trainer.logger=CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
    ]  # fmt: skip
    result = run_cli(args, cwd=tmp_path, env=THREADS)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = (tmp_path / "lightning_logs/version_0/metrics.csv").read_text().splitlines()
    header, last = metrics[0].split(","), metrics[-1].split(",")
    values = {k: v for k, v in zip(header, last) if v}
    for row in metrics[1:]:
        values.update({k: v for k, v in zip(header, row.split(",")) if v})
    assert float(values["val/zero_shot_top1"]) > 0.5  # chance is 0.1
    assert float(values["val/image_to_text_R@10"]) > 0.2
    ckpt = next((tmp_path / "lightning_logs/version_0/checkpoints").glob("*.ckpt"))

    # Held-out test digits saved as PNG files, as a user would score them.
    images, labels = load_digits_split("test")
    paths = []
    for i in range(10):
        path = tmp_path / f"digit{i}.png"
        Image.fromarray(images[i, 0].numpy().astype(np.uint8)).save(path)
        paths.append(str(path))
    result = run_cli(["score", "--ckpt", str(ckpt), "--images", *paths], cwd=tmp_path, env=THREADS)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].split("\t") == ["image", *DIGIT_NAMES]
    rows = [[float(p) for p in line.split("\t")[1:]] for line in lines[1:]]
    assert all(abs(sum(r) - 1) < 1e-3 for r in rows)
    predicted = [int(np.argmax(r)) for r in rows]
    assert sum(p == int(t) for p, t in zip(predicted, labels[:10])) >= 5

    texts = ["a photo of the number seven", "handwritten 3"]
    result = run_cli(["score", "--ckpt", str(ckpt), "--images", paths[0], "--texts", *texts, "--json"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert set(json.loads(result.stdout.strip())["scores"]) == set(texts)


def test_score_bad_input_fails_with_one_clear_line(tmp_path):
    result = run_cli(["score", "--ckpt", str(tmp_path / "missing.ckpt"), "--images", "x.png"], cwd=tmp_path)
    assert result.returncode == 1
    assert re.search(r"checkpoint not found: .*missing\.ckpt", result.stderr)
    assert "Traceback" not in result.stderr


def test_presets_parse_and_agree():
    for name in ("digits", "vit-b32"):
        cfg = yaml.safe_load((ROOT / f"configs/clip/{name}.yaml").read_text())
        text = cfg["model"]["init_args"]["text"]["backbone"]
        assert text["causal"] is True
        assert text["max_len"] == cfg["data"]["init_args"]["context_length"]
