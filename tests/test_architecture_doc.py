"""docs/architecture.md's walk-through is true: its model file, task file and preset, written out exactly as the page
shows them, train through the real CLI with the built-in digits, and the sizes came from the data module."""

import csv
import os
import re

import pytest
import torch
from helpers import ROOT, run_cli

DOC = ROOT / "docs" / "architecture.md"


def doc_files() -> dict[str, str]:
    """The page's code blocks that start with `# file: NAME`, by name."""
    blocks = re.findall(r"```(?:python|yaml)\n(.*?)```", DOC.read_text(), flags=re.S)
    files = {}
    for block in blocks:
        first, _, rest = block.partition("\n")
        if m := re.fullmatch(r"# file: (\S+)", first.strip()):
            files[m[1]] = rest
    return files


def test_the_walk_through_has_a_model_a_task_and_a_preset():
    assert sorted(doc_files()) == ["row_classifier.yaml", "row_classifier_model.py", "row_classifier_task.py"]
    model = doc_files()["row_classifier_model.py"]
    assert "lightning" not in model  # the model file is plain PyTorch, like polyformer/models


@pytest.mark.slow
def test_the_walk_through_trains_with_the_cli(tmp_path):
    for name, text in doc_files().items():
        (tmp_path / name).write_text(text)
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1",
           "POLYFORMER_CACHE": str(tmp_path / "cache")}  # fmt: skip
    proc = run_cli(
        ["fit", "--config", str(tmp_path / "row_classifier.yaml"), "--config", str(ROOT / "configs/logger/csv.yaml"),
         "--trainer.logger.init_args.save_dir", str(tmp_path / "logs"), f"--trainer.default_root_dir={tmp_path}",
         "--trainer.enable_progress_bar=false"],
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (metrics,) = (tmp_path / "logs").rglob("metrics.csv")
    rows = list(csv.DictReader(metrics.open()))
    top1 = [float(r["val/top1"]) for r in rows if r.get("val/top1")]
    assert len(top1) == 2 and top1[-1] > 0.5, top1  # 10 classes: chance is 0.1
    (ckpt,) = tmp_path.rglob("*.ckpt")
    hparams = torch.load(ckpt, weights_only=True)["hyper_parameters"]
    assert (hparams["image_size"], hparams["channels"], hparams["num_classes"]) == (8, 1, 10)  # from DataInfo
