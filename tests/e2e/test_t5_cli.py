"""The T5 presets as a user runs them: span-corruption pre-training (tiny-span.yaml), then the mixture
(tiny-mixture.yaml) fine-tuned from that checkpoint's weights and vocabulary, scored per task; and a resumed mixture
fit that ends where the uninterrupted one ends. Task sizes are shrunk for time; the presets are otherwise as shipped."""

import csv
from pathlib import Path

import pytest
import torch
import yaml
from helpers import ROOT, run_cli

SPAN, MIXTURE = (str(ROOT / "configs" / "t5" / f"{name}.yaml") for name in ("tiny-span", "tiny-mixture"))
ENV = {"OMP_NUM_THREADS": "1"}  # the test machine is shared: 2 threads per process oversubscribe it badly
FAST = ["--trainer.enable_progress_bar=false", "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=2"]


def small_mixture(tmp: Path) -> str:
    """tiny-mixture.yaml with 200 training and 8 validation examples per task."""
    cfg = yaml.safe_load(Path(MIXTURE).read_text())
    for task in cfg["data"]["init_args"]["tasks"]:
        task.update(train_size=200, val_size=8, test_size=8)
    path = tmp / "mixture.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
    return str(path)


def val_metrics(run: Path) -> dict[str, float]:
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    return {k: float(v) for r in rows for k, v in r.items() if k.startswith("val/") and v}


@pytest.mark.slow
def test_span_pretraining_then_mixture_fine_tuning(tmp_path):
    csv_logger = ["--config", str(ROOT / "configs" / "logger" / "csv.yaml")]
    span = run_cli(
        [
            "fit",
            "--config",
            SPAN,
            *FAST,
            "--trainer.max_steps=6",
            "--trainer.val_check_interval=6",
            "--trainer.limit_val_batches=1",
            *csv_logger,
        ],
        tmp_path,
        env=ENV,
    )
    assert span.returncode == 0, span.stderr[-3000:]
    ckpt = "runs/t5-tiny-span/latest/checkpoints/last.ckpt"
    assert "val/span/exact_match" in val_metrics(tmp_path / "runs/t5-tiny-span/latest")

    args = [
        "fit",
        "--config",
        small_mixture(tmp_path),
        *FAST,
        "--trainer.max_steps=4",
        "--trainer.val_check_interval=4",
        f"--model.init_from={ckpt}",
        f"--data.tokenizer={ckpt}",
        "--trainer.default_root_dir=runs/ft",
        *csv_logger,
    ]
    tuned = run_cli(args, tmp_path, env=ENV)
    assert tuned.returncode == 0, tuned.stderr[-3000:]
    metrics = val_metrics(tmp_path / "runs/ft/latest")
    for name in ("en-fr", "en-de", "en-es"):
        assert f"val/{name}/bleu" in metrics and f"val/{name}/chrf" in metrics
    for name in ("digits", "dates", "sort", "reverse"):
        assert f"val/{name}/exact_match" in metrics
    assert "val/score" in metrics
    # The fine-tuned model started from the pre-trained weights: same vocabulary, and the checkpoint's tokenizer.
    pre, post = (
        torch.load(tmp_path / p, weights_only=True, map_location="cpu")
        for p in (ckpt, "runs/ft/latest/checkpoints/last.ckpt")
    )
    assert pre["tokenizers"] == post["tokenizers"]
    key = next(k for k in pre["state_dict"] if "embed" in k)
    assert pre["state_dict"][key].shape == post["state_dict"][key].shape


@pytest.mark.slow
def test_resumed_mixture_fit_ends_where_the_uninterrupted_one_ends(tmp_path):
    config = small_mixture(tmp_path)
    base = [
        "fit",
        "--config",
        config,
        *FAST,
        "--trainer.val_check_interval=100",
        "--trainer.limit_val_batches=0",
        "--model.backbone.dropout=0.0",
    ]
    whole = run_cli([*base, "--trainer.max_steps=8", "--trainer.default_root_dir=runs/whole"], tmp_path, env=ENV)
    assert whole.returncode == 0, whole.stderr[-3000:]
    first = run_cli([*base, "--trainer.max_steps=4", "--trainer.default_root_dir=runs/part"], tmp_path, env=ENV)
    assert first.returncode == 0, first.stderr[-3000:]
    rest = run_cli(
        [
            *base,
            "--trainer.max_steps=8",
            "--trainer.default_root_dir=runs/part",
            "--ckpt_path=runs/part/latest/checkpoints/last.ckpt",
        ],
        tmp_path,
        env=ENV,
    )
    assert rest.returncode == 0, rest.stderr[-3000:]
    a, b = (
        torch.load(tmp_path / f"runs/{r}/latest/checkpoints/last.ckpt", weights_only=True, map_location="cpu")
        for r in ("whole", "part")
    )
    assert a["global_step"] == b["global_step"] == 8
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)
