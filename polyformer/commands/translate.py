"""`polyformer translate --ckpt PATH "text" ...`: translate lines with a translation checkpoint (its tokenizers are
inside it, so nothing else is needed). Lines come from the arguments, from --input FILE, or from stdin."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="polyformer translate", description=__doc__)
    p.add_argument("text", nargs="*", help="lines to translate (default: --input, else stdin)")
    p.add_argument("--ckpt", required=True, help="a checkpoint of polyformer.tasks.translation.Translation")
    p.add_argument("--input", help="a text file, one source sentence per line")
    p.add_argument("--beam-size", type=int, default=None, help="default: the checkpoint's decoding.beam_size")
    p.add_argument("--length-penalty", type=float, default=None, help="GNMT alpha; default: the checkpoint's")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="e.g. cpu, cuda, cuda:1")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse(argv)
    if args.beam_size is not None and args.beam_size < 1:
        raise ValueError(f"--beam-size must be >= 1, got {args.beam_size}")
    if args.text:
        lines = args.text
    elif args.input is not None:
        path = Path(args.input)
        if not path.is_file():
            raise FileNotFoundError(f"--input file not found: {path}")
        lines = path.read_text(encoding="utf-8").splitlines()
    else:
        lines = sys.stdin.read().splitlines()

    from polyformer.checkpointing.loading import load_task
    from polyformer.tasks.translation import Translation

    task = load_task(args.ckpt, expected=Translation).to(args.device)
    if task.tokenizer is None:
        raise ValueError(f"{args.ckpt} holds no tokenizer; it was not saved by a Translation fit with a data module")
    if args.length_penalty is not None:
        task.decoding.length_penalty = args.length_penalty
    for line in task.translate(lines, beam_size=args.beam_size, batch_size=args.batch_size):
        print(line)
    return 0
