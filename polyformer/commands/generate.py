"""`polyformer generate`: continue text prompts with a language-model checkpoint (top-k / top-p sampling with the
KV cache; greedy at temperature 0). The checkpoint carries its tokenizer, so it needs nothing else."""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="polyformer generate", description=__doc__)
    p.add_argument("--ckpt", required=True, help="a LanguageModel checkpoint (.ckpt) written by `polyformer fit`")
    p.add_argument("--prompt", action="append", help="text to continue; repeat for a batch; '-' reads stdin lines")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=50, help="0 = no top-k filter")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass, e.g. 0.9")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    import torch

    from polyformer.checkpointing.loading import load_task
    from polyformer.tasks.language_model import LanguageModel

    prompts = args.prompt or [""]
    if prompts == ["-"]:
        prompts = [line.rstrip("\n") for line in sys.stdin]
    if args.top_p is not None and not 0.0 < args.top_p <= 1.0:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    model = load_task(args.ckpt, expected=LanguageModel).to(device)
    texts = model.generate_text(
        prompts,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        top_p=args.top_p,
        seed=args.seed,
    )
    for i, (prompt, text) in enumerate(zip(prompts, texts)):
        if i:
            print("-" * 80)
        print(prompt + text)
    return 0
