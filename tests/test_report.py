"""`polyformer report` on real runs: tiny fits through the CLI (in-process, a few steps) logged by TensorBoard, CSV and
an offline W&B run, each read back by an independent reader and compared with what the page shows; run-directory
choice and bad input through the CLI; and the page opened in a real headless Chromium."""

from __future__ import annotations

import base64
import csv
import html
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, run_cli
from wandb_reader import offline_runs, read_run

from polyformer.cli import main as cli_main

LOGGERS = {
    "tensorboard": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger", "init_args": {"name": "vit"}},
    "csv": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"name": "lm"}},
    "wandb": {"class_path": "polyformer.loggers.WandbLogger", "init_args": {"offline": True}},
}
TASKS = {  # 4 steps, validation after steps 2 and 4: two validations, so "the last one" means something
    "vit": ["--config", str(ROOT / "configs/vit/digits.yaml")],
    "lm": ["--config", str(ROOT / "configs/lm/tiny.yaml"), "--data.tokenizer=byte", "--data.block_size=32",
           "--data.batch_size=8", "--model.samples.max_new_tokens=8", "--trainer.precision=32-true"],
}  # fmt: skip
CLASS_PATHS = {
    "vit": "polyformer.tasks.image_classification.ImageClassifier",
    "lm": "polyformer.tasks.language_model.LanguageModel",
}
BROWSER_HINT = (
    "the report's browser test needs a headless Chromium, and none was found on PATH. On Debian/Ubuntu, as root: "
    "apt-get update && apt-get install -y --no-install-recommends chromium-headless-shell "
    "(installs /usr/bin/chromium-headless-shell; .ci/run does this before the tests)"
)


def fit(root: Path, logger: str, task: str) -> Path:
    """A real 4-step fit through `polyformer fit`, its logs under root/<logger>; returns that folder."""
    out = root / logger
    spec = {**LOGGERS[logger], "init_args": {**LOGGERS[logger]["init_args"], "save_dir": str(out)}}
    preset = root / f"{logger}.yaml"
    preset.write_text(yaml.safe_dump({"trainer": {"logger": spec}}))
    args = [
        "fit", *TASKS[task], "--config", str(preset), "--trainer.max_steps=4", "--trainer.val_check_interval=2",
        "--trainer.check_val_every_n_epoch=null", "--trainer.limit_val_batches=1", "--trainer.log_every_n_steps=1",
        "--trainer.num_sanity_val_steps=0", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={out}",
        "--stats.window_size=2", "--model.backbone.width=32", "--model.backbone.depth=1", "--model.backbone.heads=2",
    ]  # fmt: skip
    assert cli_main(args) == 0
    if logger == "wandb":
        import wandb

        wandb.finish()
        wandb.teardown()  # stops wandb-core, so no later subprocess inherits its address
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report-runs")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POLYFORMER_CACHE", str(root / "cache"))
        mp.setenv("OMP_NUM_THREADS", "1")
        return {"tensorboard": fit(root, "tensorboard", "vit"), "csv": fit(root, "csv", "lm"),
                "wandb": fit(root, "wandb", "lm")}  # fmt: skip


def report(run_dir: Path, *extra: str) -> str:
    assert cli_main(["report", str(run_dir), *extra]) == 0
    out = Path(extra[extra.index("--out") + 1]) if "--out" in extra else run_dir / "report.html"
    return out.read_text(encoding="utf-8")


def page_series(page: str) -> dict[str, int]:
    """key -> points, from the page's table of every logged series."""
    rows = re.findall(r'data-series="([^"]*)" data-points="(\d+)"', page)
    return {html.unescape(k): int(n) for k, n in rows}


def plotted_text(page: str) -> str:
    """The text inside the page's plots (legends, titles): matplotlib keeps SVG text as text."""
    return html.unescape(" ".join(re.findall(r'<figure class="plot".*?</figure>', page, flags=re.S)))


def embedded(data: bytes, page: str) -> bool:
    return base64.b64encode(data).decode("ascii") in page


def check_curves(page: str, expected: dict[str, int]) -> None:
    assert page_series(page) == expected
    legends = plotted_text(page)
    missing = [k for k in expected if k != "hp_metric" and html.escape(k) not in legends and k not in legends]
    assert not missing, f"series without a plot: {missing}"
    assert "train/loss" in expected and "val/loss" in expected
    # train and validation of a metric share one plot
    (loss_plot,) = re.findall(r'<figure class="plot" data-plot="loss">.*?</figure>', page, flags=re.S)
    assert "train/loss" in loss_plot and "val/loss" in loss_plot


# ---- the three formats ------------------------------------------------------------------------------------------
@pytest.mark.slow  # the first of these makes the module's three fits (~30 s)
def test_tensorboard_run(runs):
    from tensorboard.backend.event_processing.event_file_loader import RawEventFileLoader
    from tensorboard.compat.proto.event_pb2 import Event

    (run_dir,) = {p.parent for p in runs["tensorboard"].rglob("events.out.tfevents.*")}
    counts: dict[str, int] = {}
    images: dict[str, list[tuple[int, bytes]]] = {}
    for events in run_dir.glob("events.out.tfevents.*"):  # the raw records, not the accumulator the report uses
        for record in RawEventFileLoader(str(events)).Load():
            event = Event.FromString(record)
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    counts[value.tag] = counts.get(value.tag, 0) + 1
                elif value.HasField("image"):
                    images.setdefault(value.tag, []).append((event.step, value.image.encoded_image_string))

    page = report(runs["tensorboard"])
    check_curves(page, counts)
    assert {"val/top1", "train/device/samples_per_sec", "memory/peak_rss_gb"} <= counts.keys()
    assert CLASS_PATHS["vit"] in page
    assert "polyformer.tasks.image_classification.ImageClassifier" in page.split('id="config"')[1]  # the config
    assert f"Run report: {runs['tensorboard'].name}/vit/version_0" in page
    last = max(step for logged in images.values() for step, _ in logged)
    latest = [png for logged in images.values() for step, png in logged if step == last]
    assert latest and all(embedded(png, page) for png in latest)
    older = [png for logged in images.values() for step, png in logged if step < last]
    assert older and not any(embedded(png, page) for png in older if png not in latest)
    for key in ("media/confusion_matrix", "media/misclassified"):
        assert f'data-media="{key}"' in page
    assert "median train/device/samples_per_sec" in page and "training time (train/time)" in page
    assert "epoch=0-step=2.ckpt" in page or "last.ckpt" in page


@pytest.mark.slow
def test_csv_run(runs):
    (metrics,) = runs["csv"].rglob("metrics.csv")
    with metrics.open(newline="") as f:
        table = list(csv.DictReader(f))
    counts = {k: sum(1 for row in table if row[k]) for k in table[0] if k != "step"}
    page = report(runs["csv"])
    check_curves(page, {k: n for k, n in counts.items() if n})
    assert {"val/ppl", "train/device/items_per_sec"} <= counts.keys()
    assert CLASS_PATHS["lm"] in page
    assert 'id="media"' not in page  # the CSV logger keeps no media: no empty section


@pytest.mark.slow
def test_wandb_offline_run(runs):
    (run_dir,) = offline_runs(runs["wandb"])
    run = read_run(run_dir)  # the tests' own reader
    media_fields = ("media/samples.", "media/attention/backbone/attn.")  # .nrows, .width, ...: not logged values
    counts: dict[str, int] = {}
    for row in run.history:
        for key, value in row.items():
            logged = not key.startswith(("_", "trainer/global_step", *media_fields))
            if logged and isinstance(value, (int, float)):
                counts[key] = counts.get(key, 0) + 1
    page = report(runs["wandb"])
    check_curves(page, counts)
    assert CLASS_PATHS["lm"] in page
    assert "W&amp;B run" in page
    # the samples table of the last validation (global step 4), as an HTML table
    samples = run.media("table", "media/samples")
    assert len(samples) == 2
    last_table = max(samples, key=lambda p: int(p.name.split("_")[1]))
    rows = json.loads(last_table.read_text())["data"]
    for row in rows:
        assert f"<td>{html.escape(str(row[1]))}</td>" in page  # the prompt column, escaped
    attention = run.media("images", "media/attention/backbone/attn")
    newest = max(attention, key=lambda p: int(p.name.rsplit("_", 2)[1]))
    assert embedded(newest.read_bytes(), page)


# ---- which run, and bad input -----------------------------------------------------------------------------------
@pytest.mark.slow
def test_chooses_latest_then_newest_and_says_so(runs, tmp_path, capsys):
    (source,) = {p.parent for p in runs["csv"].rglob("metrics.csv")}
    root = tmp_path / "lm-tiny"
    for n in (0, 1, 2):
        shutil.copytree(source, root / f"version_{n}")
        os.utime(root / f"version_{n}" / "metrics.csv", (time.time() + n, time.time() + n))
    (root / "latest").symlink_to("version_1")
    page = report(root)
    assert "Run report: lm-tiny/version_1" in page
    assert "using" in capsys.readouterr().out and "latest" in page
    (root / "latest").unlink()
    out = tmp_path / "elsewhere.html"
    page = report(root, "--out", str(out))
    assert "Run report: lm-tiny/version_2" in page  # the newest
    assert "version_2" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere.html", "lm-tiny"]  # no temp file left
    # the old layout: default_root_dir/lightning_logs/version_N
    old = tmp_path / "old"
    shutil.copytree(source, old / "lightning_logs" / "version_0")
    assert "Run report: old/lightning_logs/version_0" in report(old)


@pytest.mark.slow  # ~12 s of CPU: the CLI's error path imports torch and Lightning
def test_bad_run_dir_is_one_line_through_the_cli(tmp_path):
    result = run_cli(["report", str(tmp_path / "missing")], cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines() == [
        f"polyformer: error: {tmp_path / 'missing'}: no such directory; give a run directory, e.g. runs/lm-tiny or "
        "its version_N",
        "(run with --debug for the traceback)",
    ]


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda p: p, "no logs found under"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "is a file"),
        (lambda p: (p / "checkpoints").mkdir() or (p / "checkpoints" / "metrics.csv").write_text("") or p, "no logs"),
    ],
)
def test_bad_run_dir_is_one_line(tmp_path, capsys, make, expected):
    run_dir = make(tmp_path)
    assert cli_main(["report", str(run_dir)]) == 1  # the CLI's own handler: one line, no traceback
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert len(err.splitlines()) == 2 and "Traceback" not in err
    assert first.startswith("polyformer: error: ") and expected in first and str(run_dir) in first, err
    if expected == "no logs found under":
        assert "events.out.tfevents" in first and "metrics.csv" in first and ".wandb" in first


# ---- in a real browser ------------------------------------------------------------------------------------------
def find_browser() -> str:
    for name in ("chromium-headless-shell", "chromium", "chromium-browser", "chrome-headless-shell", "google-chrome"):
        if path := shutil.which(name):
            return path
    pytest.fail(BROWSER_HINT, pytrace=False)


def browse(url: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start.
    command = [
        find_browser(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--no-first-run",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--window-size=1280,2400",
        "--virtual-time-budget=10000",
        *args,
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.browser
@pytest.mark.slow  # makes the module's fits when run alone
def test_page_renders_in_headless_chromium(runs, tmp_path):
    from PIL import Image

    page_path = tmp_path / "report.html"
    page = report(runs["tensorboard"], "--out", str(page_path))
    assert not re.search(r'(src|href)="(https?:)?//', page)  # self-contained: nothing to fetch
    plots, images = page.count('<figure class="plot"'), page.count("<img ")
    assert plots >= 5 and images >= 3

    dom = browse(page_path.as_uri(), tmp_path, "--dump-dom").stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:2000]
    attrs = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body[1]))
    assert attrs.get("rendered") == "yes", f"the page's check script did not run: {body[0]}"
    assert int(attrs["plots"]) == plots and int(attrs["plots-visible"]) == plots, attrs
    assert int(attrs["images"]) == images and int(attrs["images-loaded"]) == images, attrs

    shot = tmp_path / "report.png"
    browse(page_path.as_uri(), tmp_path, f"--screenshot={shot}")
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 2400)
    small = image.resize((320, 600))
    inked = sum(1 for r, g, b in small.getdata() if min(r, g, b) < 200)
    assert inked > 0.02 * 320 * 600, f"the screenshot is nearly blank ({inked} dark pixels)"
    assert len(set(small.getdata())) > 50  # curves in colour, text, images: not one flat colour
