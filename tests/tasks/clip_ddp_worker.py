"""One rank of the 2-process CLIP check (run by test_contrastive_ddp.py with RANK/WORLD_SIZE/MASTER_* set).

Each rank trains on its half of a fixed batch under torch DDP (gloo) and evaluates an uneven shard (rank r takes
samples r, r + 2, ...); it saves its loss, gradients and evaluation metrics for the test to compare with one process.
The same module builds the model and data for the single-process reference, so both sides see identical inputs.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from polyformer.backbone import TransformerConfig
from polyformer.data.image_text import tokenize
from polyformer.data.tokenizers import byte_level
from polyformer.tasks.contrastive import CLIP, ImageEncoderConfig, TextEncoderConfig

TRAIN_BATCH, EVAL_SIZE = 8, 7
CLASSES = ["zero", "one", "two"]


def make_model(loss: str = "clip") -> CLIP:
    torch.manual_seed(0)
    image = ImageEncoderConfig(TransformerConfig(width=16, depth=1, heads=2, dropout=0.0, position="none"), 8, 4, 1)
    text = TextEncoderConfig(
        TransformerConfig(width=16, depth=1, heads=2, dropout=0.0, position="learned", max_len=12, causal=True)
    )
    tok = byte_level()
    # SigLIP with bias 0: at its -10 start every pair's sigmoid is saturated and the gradients are all tiny.
    kw = {"loss": "siglip", "init_logit_bias": 0.0} if loss == "siglip" else {}
    model = CLIP(image=image, text=text, embed_dim=8, vocab_size=tok.vocab_size, eos_id=tok.eos_id, **kw)
    model.configure_model()
    model.tokenizer, model.class_names, model.prompts = tok, CLASSES, ["{}", "a {}"]
    return model.double()


def make_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images (n, 1, 8, 8), caption tokens (n, 12) with two repeated captions, labels (n,)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)
    labels = torch.arange(n) % len(CLASSES)
    captions = [f"{CLASSES[int(c)]} {i % 3}" for i, c in enumerate(labels)]  # e.g. "one 1" repeats
    return images, tokenize(make_model().tokenizer, captions, 12), labels


def loss_and_grads(model: torch.nn.Module, images: torch.Tensor, tokens: torch.Tensor) -> dict:
    inner = model.module if isinstance(model, DistributedDataParallel) else model
    image, text, scale = model(images, tokens)
    loss = inner.objective(image, text, scale)  # the task's own: contrastive_loss, or sigmoid_loss with its bias
    loss.backward()
    return {"loss": loss.detach(), "grads": {n: p.grad.clone() for n, p in inner.named_parameters()}}


def evaluate(model: CLIP, images: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        model._eval = {"image": [model.model.encode_image(images)], "text": [model.model.encode_text(tokens)]}
    model._eval.update(tokens=[tokens], label=[labels])
    return model.evaluate("val")


def main(out_dir: str, loss: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = make_model(loss)
    images, tokens, _ = make_data(TRAIN_BATCH, seed=1)
    rows = slice(rank * TRAIN_BATCH // world, (rank + 1) * TRAIN_BATCH // world)
    result = loss_and_grads(DistributedDataParallel(model), images[rows], tokens[rows])
    e_images, e_tokens, e_labels = make_data(EVAL_SIZE, seed=2)
    result["metrics"] = evaluate(model, e_images[rank::world], e_tokens[rank::world], e_labels[rank::world])
    result["per_class"] = model.per_class_top1
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "clip")
