"""`polyformer score`: how well each image matches each text under a CLIP checkpoint (softmax over the texts, as in
CLIP's zero-shot use). Without --texts the checkpoint's class names are scored with its prompt templates averaged
(zero-shot classification). Prints a tab-separated table: one row per image, one column per text."""

from __future__ import annotations

import argparse
import json
import sys


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="polyformer score", description=__doc__)
    p.add_argument("--ckpt", required=True, help="a CLIP checkpoint saved by `polyformer fit`")
    p.add_argument("--images", nargs="+", required=True, help="image files")
    p.add_argument("--texts", nargs="+", help="texts to score; default: the checkpoint's class names (zero-shot)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image instead of a table")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    import torch

    from polyformer.checkpointing.loading import load_task
    from polyformer.data.image_text import load_image, normalize
    from polyformer.tasks.contrastive import CLIP

    model = load_task(args.ckpt, expected=CLIP)
    pre = model.preprocess
    if not pre:
        raise ValueError(f"{args.ckpt} stores no image preprocessing; it was not trained by `polyformer fit`")
    images = torch.stack([load_image(path, pre["image_size"], pre["channels"]) for path in args.images])
    images = normalize(images, tuple(pre["mean"]), tuple(pre["std"]))  # (B, C, S, S)
    if args.texts:
        texts, probs = args.texts, model.score(images, args.texts)
    else:
        if not model.class_names:
            raise ValueError(f"{args.ckpt} has no class names: give --texts")
        texts, probs = model.class_names, model.score_classes(images)
    for path, row in zip(args.images, probs.tolist()):
        if args.json:
            print(json.dumps({"image": path, "scores": dict(zip(texts, row))}))
    if not args.json:
        print("\t".join(["image", *texts]))
        for path, row in zip(args.images, probs.tolist()):
            print("\t".join([path, *(f"{p:.4f}" for p in row)]))
    sys.stdout.flush()
    return 0
