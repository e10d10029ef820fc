"""`polyformer export`: take a trained model out of its checkpoint, into the tool its users deploy with.

    polyformer export --ckpt C --format hf|timm|open_clip|onnx|safetensors --out DIR

- `safetensors` (every task): the plain model's weights and the config that rebuilds it, plus the tokenizer
  (`polyformer.weights.native.load_model(DIR)`, or `--model.init_from=DIR/model.safetensors` to fine-tune);
- `hf` (language model): a transformers GPT-2 folder, `AutoModelForCausalLM.from_pretrained(DIR)`;
- `timm` (ViT): timm weights and the `create_model` arguments that load them;
- `open_clip` (CLIP): an open_clip state dict and model config;
- `onnx` (every task): ONNX graphs with dynamic batch and sequence axes, for onnxruntime.

The folder appears whole or not at all: everything is written into a temporary sibling first, so an export that
fails halfway leaves no partial folder. An existing folder is replaced only with --overwrite.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def parse_args(argv: list[str]) -> argparse.Namespace:
    from polyformer.weights.export import FORMATS  # the dispatcher's table: a format added there is offered here

    p = argparse.ArgumentParser(
        prog="polyformer export", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--ckpt", required=True, help="a checkpoint (.ckpt) written by `polyformer fit`")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, type=Path, help="the folder to write (created; must not exist)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    from polyformer.checkpointing.files import write_directory_atomically
    from polyformer.checkpointing.loading import load_task
    from polyformer.weights.export import export

    out: Path = args.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; give a folder path")
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"--out {out} already exists and is not empty; choose another folder or add --overwrite")
    task = load_task(args.ckpt)
    tokenizer = getattr(task, "tokenizer", None)
    source_tokenizer = getattr(task, "source_tokenizer", None)
    write_directory_atomically(
        out, lambda tmp: export(task.model, args.format, tmp, tokenizer=tokenizer, source_tokenizer=source_tokenizer)
    )
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    print(f"exported {type(task.model).__name__} ({args.format}) to {out}: {', '.join(files)}")
    return 0
