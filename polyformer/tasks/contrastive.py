"""CLIP (Radford et al. 2021): the task around `polyformer.models.clip.CLIP` (an image tower and a text tower from the
shared backbone, projected into one space, with a learned temperature), trained with a symmetric contrastive loss
gathered across ranks, or with SigLIP's pairwise sigmoid loss and a learned logit bias (`loss="siglip"`, Zhai et al.
2023); evaluated zero-shot (class names x prompt templates, open_clip's `build_zero_shot_classifier` recipe) and by
image<->text retrieval recall@K. SigLIP keeps that evaluation: a sigmoid is monotone in the logit, so the ranking of
classes and captions is the same; `score` gives each image-text pair its sigmoid match probability (what that loss
trains), `score_classes` a softmax over the classes for both losses.

The network is held as `self.model`; its first weights may come from open_clip (`init_from="open_clip:<name>[@<tag
or file>]"`) or Hugging Face (`init_from="hf:<name or folder>"`, `polyformer.weights.open_clip`) or a polyformer
`.ckpt`. The logit scale is clamped at `max_logit_scale` in place after each optimizer step, as open_clip does. Loss
and cross-rank evaluation: `contrastive_loss.py`. The tokenizer, class names, prompts and image preprocessing come
from the data module's `DataInfo` and are stored in checkpoints, for zero-shot evaluation and `polyformer score`.

Legend: B batch, T context, E embedding dim, C classes, P prompts, N evaluation set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor
from torch.optim import Optimizer

from polyformer.data.image_text import tokenize
from polyformer.data.info import DataInfo
from polyformer.data.tokenizers import Tokenizer, decode_rows
from polyformer.models.clip import CLIP as CLIPModel
from polyformer.models.clip import CLIPConfig, ImageEncoderConfig, TextEncoderConfig, check_logit_scale
from polyformer.tasks.base import OptimizerConfig, TaskModule
from polyformer.tasks.contrastive_loss import (
    contrastive_loss,
    gather_uneven,
    retrieval_recall,
    sigmoid_loss,
    topk_hits,
)
from polyformer.tasks.media import Heatmap, Media, MediaRequest, Scalars, Table, tower_overlay

__all__ = ["CLIP", "ImageEncoderConfig", "Retrieval", "TextEncoderConfig"]


class Retrieval(NamedTuple):
    """One evaluation image's caption and the captions nearest to it (gathered order: rank 0's first batch first)."""

    caption: str
    retrieved: list[str]
    scores: list[float]  # cosine similarities, best first


class CLIP(TaskModule):
    architecture_hparams = ("image", "text", "embed_dim", "vocab_size", "loss")
    size_arguments = ("vocab_size", "eos_id")

    def __init__(
        self,
        image: ImageEncoderConfig | None = None,
        text: TextEncoderConfig | None = None,
        embed_dim: int = 512,
        vocab_size: int | None = None,  # linked from the data's tokenizer
        eos_id: int | None = None,  # linked from the data's tokenizer; the text tower pools here
        loss: Literal["clip", "siglip"] = "clip",  # siglip: sigmoid per pair (Zhai et al. 2023), texts gathered only
        init_logit_scale: float | None = None,  # None: 1/0.07 for clip (Radford et al.), 10 for siglip (Zhai et al.)
        max_logit_scale: float = 100.0,
        init_logit_bias: float = -10.0,  # siglip's b at the start (the paper's)
        retrieval_ks: tuple[int, ...] = (1, 5, 10),
        optimizer: OptimizerConfig | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
        init_from: str | None = None,  # "open_clip:ViT-B-32@openai", "hf:openai/clip-vit-base-patch32", a .ckpt
    ) -> None:
        super().__init__(optimizer, compile, activation_checkpointing, init_from)
        if loss not in ("clip", "siglip"):
            raise ValueError(f"model.loss must be 'clip' or 'siglip', got {loss!r}")
        if init_logit_scale is None:
            init_logit_scale = 10.0 if loss == "siglip" else 1 / 0.07
        # CLIPConfig checks this too; here a wrong preset fails at once, before the data module prepares its data.
        check_logit_scale(init_logit_scale, max_logit_scale)
        if not retrieval_ks or min(retrieval_ks) < 1:
            raise ValueError(f"model.retrieval_ks must be positive ranks such as (1, 5, 10), got {retrieval_ks}")
        self.save_hyperparameters()
        self.image_cfg, self.text_cfg = image or ImageEncoderConfig(), text or TextEncoderConfig()
        self.embed_dim, self.vocab_size, self.eos_id = embed_dim, vocab_size, eos_id
        self.init_logit_scale, self.max_logit_scale, self.retrieval_ks = init_logit_scale, max_logit_scale, retrieval_ks
        self.loss, self.init_logit_bias = loss, init_logit_bias
        # From the data module (connect_data) or a checkpoint, for zero-shot and the `score` verb.
        self.tokenizer: Tokenizer | None = None
        self.class_names: list[str] | None = None
        self.prompts: list[str] = ["a photo of a {}."]
        self.preprocess: dict[str, Any] = {}
        # Kept after each validation epoch for media(): zero-shot top-1 per class (computed on the gathered set, the
        # same on every rank), the nearest captions of the first evaluation images, and this rank's first validation
        # batch's embeddings and scale (so media() needs no forward pass, which under FSDP would be a collective).
        self.per_class_top1: dict[str, float] = {}
        self.retrievals: list[Retrieval] = []
        self._first_batch: tuple[Tensor, Tensor, Tensor] | None = None
        self._eval: dict[str, list[Tensor]] = {}  # this rank's evaluation embeddings, gathered at epoch end
        self.build()

    # ---- building ---------------------------------------------------------------------------------------------
    def connect_data(self, info: DataInfo) -> None:
        self.link("vocab_size", info.vocab_size)
        self.link("eos_id", info.eos_id)
        if info.channels is not None and info.channels != self.image_cfg.channels:
            raise ValueError(
                f"the data has {info.channels}-channel images but model.image.channels is {self.image_cfg.channels}; "
                "set one to the other"
            )
        if info.tokenizer is not None:
            self.tokenizer = info.tokenizer
        if info.class_names is not None:
            self.class_names = list(info.class_names)
        if info.prompts:
            self.prompts = list(info.prompts)
        if info.image_size is not None and info.mean is not None and info.std is not None:
            self.preprocess = {"image_size": info.image_size, "channels": info.channels, "mean": info.mean,
                               "std": info.std}  # fmt: skip

    def build_model(self) -> CLIPModel:
        assert self.vocab_size is not None and self.eos_id is not None
        cfg = CLIPConfig(
            self.image_cfg, self.text_cfg, self.embed_dim, self.vocab_size, self.eos_id, self.init_logit_scale,
            self.max_logit_scale, self.loss, self.init_logit_bias,
        )  # fmt: skip
        return CLIPModel(cfg)

    # ---- model ------------------------------------------------------------------------------------------------
    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.model(images, tokens)

    def _tokenize(self, texts: list[str]) -> Tensor:
        if self.tokenizer is None:
            raise ValueError("this CLIP model has no tokenizer: train it with a data module or load a checkpoint")
        return tokenize(self.tokenizer, texts, self.text_cfg.backbone.max_len).to(self.device)

    @torch.no_grad()
    def score(self, images: Tensor, texts: list[str]) -> Tensor:
        """Probabilities (B, len(texts)) that each preprocessed image matches each text: softmax over the texts
        (CLIP), or each pair's own sigmoid (SigLIP: what its loss trains; rows need not sum to 1)."""
        logits = self.model.similarity(images.to(self.device), self._tokenize(texts))
        return logits.sigmoid() if self.loss == "siglip" else logits.softmax(dim=-1)

    @torch.no_grad()
    def score_classes(self, images: Tensor) -> Tensor:
        """Zero-shot class probabilities (B, C) of preprocessed images over the stored class names, each class's
        prompt templates averaged (`class_embeddings`)."""
        if not self.class_names:
            raise ValueError("this CLIP model has no class names: train it with a labelled data module or give texts")
        classifier = self.class_embeddings(self.class_names, self.prompts)  # (C, E)
        logits = self.model.scale() * self.model.encode_image(images.to(self.device)) @ classifier.T
        return logits.softmax(dim=-1)

    @torch.no_grad()
    def class_embeddings(self, class_names: list[str], prompts: list[str]) -> Tensor:
        """Zero-shot classifier (C, E): each class's prompt embeddings averaged, then renormalised (open_clip)."""
        tokens = self._tokenize([p.format(c) for c in class_names for p in prompts])  # C * P, class-major
        emb = torch.cat([self.model.encode_text(t) for t in tokens.split(256)])  # (C * P, E)
        return F.normalize(emb.view(len(class_names), len(prompts), -1).mean(dim=1), dim=-1)

    # ---- training ---------------------------------------------------------------------------------------------
    def training_flops(self, batch: dict[str, Tensor]) -> float:
        return self.model.training_flops(batch["image"], batch["text"])

    def objective(self, image: Tensor, text: Tensor, scale: Tensor) -> Tensor:
        """This rank's loss against the global batch; its mean over ranks is the 1-process loss."""
        if self.loss == "siglip":
            return sigmoid_loss(image, text, scale, self.model.bias())
        return contrastive_loss(image, text, scale)

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        image, text, scale = self.model(batch["image"], batch["text"])
        loss = self.objective(image, text, scale)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # mean over ranks = the global-batch loss
        self.log("train/logit_scale", scale.detach())
        if self.loss == "siglip":
            self.log("train/logit_bias", self.model.bias().detach())
        return loss

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Optimizer | LightningOptimizer,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        # Right after the step, not in a later hook: callbacks' on_train_batch_end (checkpoints every n steps) run
        # before the module's, and on_before_zero_grad runs inside the next step's closure, after its forward pass,
        # and never after the last step. With gradient accumulation this runs once per real step.
        with torch.no_grad():
            self.model.logit_scale.clamp_(max=math.log(self.max_logit_scale))

    # ---- evaluation -------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._eval = {"image": [], "text": [], "tokens": [], "label": []}
        self._first_batch = None

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, prefix: str = "val") -> None:
        image, text, scale = self.model(batch["image"], batch["text"])
        if self.loss == "siglip":  # the training loss within each evaluation batch (no gather: batches may differ)
            logits = scale * image @ text.T + self.model.bias()
            labels = 2 * torch.eye(len(image), device=self.device, dtype=logits.dtype) - 1
            in_batch = -F.logsigmoid(labels * logits).sum() / len(image)
        else:  # image->text within each evaluation batch
            in_batch = F.cross_entropy(scale * image @ text.T, torch.arange(len(image), device=self.device))
        self.log(f"{prefix}/loss", in_batch, sync_dist=True)
        for key, value in (("image", image), ("text", text), ("tokens", batch["text"]), ("label", batch["label"])):
            self._eval[key].append(value)
        if prefix == "val" and batch_idx == 0:
            self._first_batch = (image.detach(), text.detach(), scale.detach())

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.evaluate("val"), sync_dist=False)  # identical on every rank: computed on gathered data

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx, prefix="test")

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.evaluate("test"), sync_dist=False)

    def evaluate(self, prefix: str) -> dict[str, float]:
        """Zero-shot top-1/top-5 and retrieval recall@K over the whole evaluation set, gathered from all ranks. Keeps
        the per-class top-1 and the retrieval examples for media()."""
        data = {k: gather_uneven(torch.cat(v)) for k, v in self._eval.items()}  # each (N, ...)
        _, group = torch.unique(data["tokens"], dim=0, return_inverse=True)  # identical captions share a group
        recall = retrieval_recall(data["image"], data["text"], group, self.retrieval_ks)
        metrics = {f"{prefix}/{k}": v for k, v in recall.items()}
        self.retrievals = self._retrievals(data)
        labels = data["label"]
        if self.class_names and self.tokenizer is not None and bool((labels >= 0).all()):
            classifier = self.class_embeddings(self.class_names, self.prompts)  # (C, E)
            logits = data["image"] @ classifier.T  # (N, C)
            hits = topk_hits(logits, labels, (1, 5))
            metrics[f"{prefix}/zero_shot_top1"] = hits[1].float().mean().item()
            metrics[f"{prefix}/zero_shot_top5"] = hits[5].float().mean().item()
            self.per_class_top1 = {
                name: hits[1][labels == c].float().mean().item()
                for c, name in enumerate(self.class_names)
                if bool((labels == c).any())
            }
        return metrics

    def _retrievals(self, data: dict[str, Tensor], n: int = 8, k: int = 3) -> list[Retrieval]:
        """The top-k retrieved captions of the first n evaluation images (gathered order)."""
        if self.tokenizer is None:
            return []
        sim = data["image"][:n].float() @ data["text"].float().T  # (n, N)
        top = sim.topk(min(k, sim.shape[1]), dim=1)
        captions = decode_rows(self.tokenizer, data["tokens"][:n].cpu())
        retrieved = decode_rows(self.tokenizer, data["tokens"][top.indices.flatten()].cpu())
        per_row = top.indices.shape[1]
        return [
            Retrieval(captions[i], retrieved[i * per_row : (i + 1) * per_row], top.values[i].tolist())
            for i in range(len(captions))
        ]

    # ---- media ------------------------------------------------------------------------------------------------
    def media(self, batch: Any, request: MediaRequest) -> list[Media]:
        """After a validation epoch, from what it kept:
        - "similarity": a heatmap of the scaled cosine similarity of the first `request.similarity_size` images and
          captions of the first validation batch, from the embeddings its validation step computed (no forward pass
          here); `batch` (its first rows) gives the captions and the images, drawn as thumbnails beside the rows;
        - "zero_shot_per_class": a table of zero-shot top-1 per class, also logged as `val/zero_shot_top1/<class>`;
        - "retrieval": up to `request.num_samples` evaluation images with their caption and the nearest captions
          (cosine), the image shown when it is among `batch`'s rows (the gathered set starts with rank 0's first
          batch, the one `batch` comes from);
        - "attention_overlay": the first `request.overlay_images` images of `batch` with where the image tower looks
          (its pooling token's attention over the patches per layer, and the rollout; drawn by the callback from
          the weights it recorded). The text tower keeps the callback's token x token grids."""
        items: list[Media] = []
        images = batch.get("image") if isinstance(batch, dict) else None
        tokens = batch.get("text") if isinstance(batch, dict) else None
        if self._first_batch is not None and tokens is not None:
            image, text, scale = self._first_batch
            n = min(request.similarity_size, len(image), len(tokens))
            sim = (scale * image[:n] @ text[:n].T).float().cpu()
            captions = decode_rows(self.tokenizer, tokens[:n]) if self.tokenizer else [str(i) for i in range(n)]
            items.append(
                Heatmap("similarity", sim, "image-text similarity (scaled cosine)", xlabels=captions,
                        ylabels=[f"image {i}" for i in range(n)], xlabel="caption", ylabel="image",
                        row_images=list(images[:n]) if images is not None and len(images) >= n else None)
            )  # fmt: skip
        if self.per_class_top1:
            rows: list[list[Any]] = [[name, top1] for name, top1 in self.per_class_top1.items()]
            items.append(Table("zero_shot_per_class", ["class", "top1"], rows))
            items.append(Scalars({f"val/zero_shot_top1/{name}": top1 for name, top1 in self.per_class_top1.items()}))
        shown = self.retrievals[: request.num_samples]
        if shown:
            with_images = images is not None and len(shown) <= len(images)
            columns = ["image", "caption", "retrieved (cosine)"] if with_images else ["caption", "retrieved (cosine)"]
            table = []
            for i, r in enumerate(shown):
                row: list[Any] = [r.caption, " | ".join(f"{c} ({s:.2f})" for c, s in zip(r.retrieved, r.scores))]
                table.append([images[i], *row] if with_images else row)
            items.append(Table("retrieval", columns, table))
        if images is not None:
            shown = list(images[: request.overlay_images])
            captions = (
                decode_rows(self.tokenizer, tokens[: len(shown)]) if self.tokenizer and tokens is not None else None
            )
            items.append(tower_overlay("attention_overlay", self.model.image, "image", shown, captions))
        return items

    # ---- checkpoints ------------------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["clip"] = {
            "tokenizer": None if self.tokenizer is None else self.tokenizer.to_json(),
            "class_names": None if self.class_names is None else list(self.class_names),
            "prompts": list(self.prompts),
            "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in self.preprocess.items()},
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        extra = checkpoint.get("clip", {})
        if extra.get("tokenizer"):
            self.tokenizer = Tokenizer.from_json(extra["tokenizer"])
        self.class_names, self.prompts = extra.get("class_names"), extra.get("prompts", self.prompts)
        self.preprocess = extra.get("preprocess", {})
