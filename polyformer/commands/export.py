"""`polyformer export`: take a trained model out of its checkpoint, into the tool its users deploy with.

    polyformer export --ckpt C --format hf|timm|open_clip|onnx|safetensors --out DIR

- `safetensors` (every task): the plain model's weights and the config that rebuilds it, plus the tokenizer
  (`polyformer.weights.native.load_model(DIR)`, or `--model.init_from=DIR/model.safetensors` to fine-tune);
- `hf` (language model): a transformers GPT-2 folder, `AutoModelForCausalLM.from_pretrained(DIR)`;
- `timm` (ViT): timm weights and the `create_model` arguments that load them;
- `open_clip` (CLIP): an open_clip state dict and model config;
- `onnx` (every task): ONNX graphs with dynamic batch and sequence axes, for onnxruntime.

With --log_model the folder is also logged as a W&B model artifact, to the W&B run that trained the checkpoint when
it names one (offline without credentials: `wandb sync` uploads it later).

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
    p.add_argument(
        "--log_model",
        action="store_true",
        help="also log the folder as a W&B model artifact (to the checkpoint's training run when it has one)",
    )
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
    if args.log_model:
        from polyformer.weights.wandb_artifact import check_wandb_enabled

        check_wandb_enabled()
    task = load_task(args.ckpt)
    tokenizer = getattr(task, "tokenizer", None)
    source_tokenizer = getattr(task, "source_tokenizer", None)
    write_directory_atomically(
        out, lambda tmp: export(task.model, args.format, tmp, tokenizer=tokenizer, source_tokenizer=source_tokenizer)
    )
    files = sorted(str(f.relative_to(out)) for f in out.rglob("*") if f.is_file())
    print(f"exported {type(task.model).__name__} ({args.format}) to {out}: {', '.join(files)}")
    if args.log_model:
        from polyformer.checkpointing.files import load_checkpoint
        from polyformer.weights.wandb_artifact import log_export_artifact

        meta = load_checkpoint(args.ckpt, mmap=True).get("wandb") or {}
        ckpt = Path(args.ckpt).resolve()
        run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else out.resolve().parent
        where = log_export_artifact(out, args.format, ckpt, meta, type(task).__name__, run_dir)
        print(f"logged {out} as a W&B model artifact in {where}")
    return 0
