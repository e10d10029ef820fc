"""`polyformer classify CHECKPOINT IMAGE [IMAGE ...]`: the top classes of image files under an `ImageClassifier`.

Images are converted to the checkpoint's channel count, resized and centre-cropped to its image size and normalised
with the statistics it was trained with (all stored in the checkpoint), as the validation transform does.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="polyformer classify", description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="an ImageClassifier checkpoint (.ckpt)")
    parser.add_argument("images", type=Path, nargs="+", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--top", type=int, default=5, help="how many classes to print per image (default 5)")
    parser.add_argument("--crop-pct", type=float, default=1.0, help="resize to size / crop_pct, then centre-crop")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.top < 1 or not 0 < args.crop_pct <= 1 or args.batch_size < 1:
        raise ValueError(f"need --top >= 1, 0 < --crop-pct <= 1, --batch-size >= 1; got {args.top}, {args.crop_pct}")
    missing = [str(p) for p in args.images if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"image file(s) not found: {', '.join(missing)}")

    from polyformer.checkpointing.loading import load_task
    from polyformer.data.images import eval_transform
    from polyformer.tasks.image_classification import ImageClassifier

    task = load_task(args.ckpt, expected=ImageClassifier)
    transform = eval_transform(task.image_size, task.channels, task.mean, task.std, args.crop_pct)
    names = task.class_names or [str(i) for i in range(task.num_classes)]
    top = min(args.top, task.num_classes)
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start : start + args.batch_size]
        batch = torch.stack([transform(_open(p)) for p in paths])  # (B, C, H, W)
        with torch.inference_mode():
            probs, classes = task.model(batch).softmax(dim=-1).topk(top, dim=-1)
        for path, p, c in zip(paths, probs.tolist(), classes.tolist()):
            print(f"{path}: " + ", ".join(f"{names[k]} {q:.3f}" for k, q in zip(c, p)))
    return 0


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None
