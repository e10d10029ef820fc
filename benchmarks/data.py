"""Data pipeline speed: each data module's training loader alone (no model), in batches/s and items/s, next to
our model's training throughput on the same task from the same report, to show whether the loader keeps up.

Setup (tokenizing, BPE training, the token cache) and worker start-up are not timed: the clock starts after the
first batch. Images are real files (PNG, generated here) decoded and augmented in worker processes.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .models import SHAPES, Shape
from .report import Row

WORKERS = 2
CLASSES = 4


def _image_folder(root: Path, size: int, per_class: int) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):  # a little larger than the model's input: resize and crop have work
            pixels = rng.integers(0, 256, (size + size // 8, size + size // 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def text_module(s: Shape, tmp: Path) -> tuple[Any, str, Callable[[Any], int]]:
    from polyformer.data.text import TextDataModule

    dm = TextDataModule(
        source="builtin", tokenizer="byte", block_size=s.seq_len, batch_size=s.batch, cache_dir=str(tmp / "cache"),
        num_workers=WORKERS,
    )  # fmt: skip
    return (
        dm,
        f"built-in text, byte tokens, memory-mapped blocks of {s.seq_len}, B{s.batch}",
        lambda b: b[:, 1:].numel(),
    )


def image_module(s: Shape, tmp: Path) -> tuple[Any, str, Callable[[Any], int]]:
    from polyformer.data.images import ImageDataModule

    root = _image_folder(tmp / "images", s.image_size, per_class=max(2, s.batch * 3 // CLASSES))
    dm = ImageDataModule(
        "folder", root=str(root), image_size=s.image_size, channels=3, batch_size=s.batch, num_workers=WORKERS
    )
    return dm, f"PNG folder, decode + augment to {s.image_size}px, B{s.batch}", lambda b: len(b[1])


def translation_module(s: Shape, tmp: Path) -> tuple[Any, str, Callable[[Any], int]]:
    from polyformer.data.translation import TranslationData

    dm = TranslationData(
        "numbers", bpe_vocab_size=1000, batch_size=s.batch, train_size=max(400, 100 * s.batch), val_size=20,
        test_size=20,
        num_workers=WORKERS,
    )  # fmt: skip
    return dm, f"numbers corpus, joint BPE 1000, length buckets, B{s.batch}", lambda b: b["target_out"].numel()


def image_text_module(s: Shape, tmp: Path) -> tuple[Any, str, Callable[[Any], int]]:
    from polyformer.data.image_text import ImageTextData

    dm = ImageTextData("digits", tokenizer="byte", batch_size=s.batch, num_workers=WORKERS)
    return dm, f"digits + captions (8px), byte tokens, B{s.batch}", lambda b: len(b["image"])


MODULES = {"lm": text_module, "vit": image_module, "mt": translation_module, "clip": image_text_module}
NAMES = {"lm": "TextDataModule", "vit": "ImageDataModule", "mt": "TranslationData", "clip": "ImageTextData"}


def loader_speed(dm: Any, items: Callable[[Any], int], batches: int) -> tuple[float, float]:
    """(batches/s, items/s) over `batches` batches after the first."""
    dm.prepare_data()
    dm.setup("fit")
    it = iter(dm.train_dataloader())
    next(it)  # workers started, first batch ready
    start, count, seen = time.perf_counter(), 0, 0
    for batch in it:
        count, seen = count + 1, seen + items(batch)
        if count == batches:
            break
    elapsed = time.perf_counter() - start
    return count / elapsed, seen / elapsed


def run_data(args: argparse.Namespace, model_rows: list[Row] | None = None) -> tuple[list[Row], list[str]]:
    rows: list[Row] = []
    skipped: list[str] = []
    batches = 2 * args.rounds + 2
    torch.manual_seed(args.seed)
    for task in args.tasks:
        s = SHAPES[task][args.size]
        with tempfile.TemporaryDirectory() as tmp:
            dm, config, items = MODULES[task](s, Path(tmp))
            try:
                per_s, items_per_s = loader_speed(dm, items, batches)
            except (ValueError, RuntimeError) as e:  # a data module that cannot run at this size: say why
                skipped.append(f"data pipeline of {task}: {e}")
                continue
        # Our training throughput on this task, from the same report: how far the loader is ahead of the model.
        ours = next((r for r in model_rows or [] if r.section == "train" and r.task == task), None)
        model_items = ours.ours_per_s if ours is not None else None
        rows.append(
            Row(
                "data",
                NAMES[task],
                config,
                "",
                "",
                "items/s",
                per_s,
                model_items or float("nan"),
                items_per_s / model_items if model_items else float("nan"),
                f"{items_per_s:,.0f} items/s, {WORKERS} workers",
            )  # fmt: skip
        )
    return rows, skipped
