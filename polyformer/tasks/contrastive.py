"""CLIP (Radford et al. 2021): an image tower and a text tower from the shared backbone, projected into one space
and trained with a symmetric contrastive loss at a learned temperature; evaluated zero-shot (class names x prompt
templates, open_clip's `build_zero_shot_classifier` recipe) and by image<->text retrieval recall@K.

Image tower: the ViT of the image task (`ImageTower`), class-token pooled. Text tower: the backbone with a causal
mask, learned positions and the final norm, pooled at the end-of-text token. The logit scale starts at 1/0.07 and
is clamped at 100 (the paper, section 2.5), in place after each optimizer step as open_clip does. Loss and
cross-rank evaluation: `contrastive_loss.py`.

Legend: B batch, T context, D tower width, E embedding dim, C classes, P prompts, N evaluation set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.core.optimizer import LightningOptimizer
from torch import Tensor, nn
from torch.optim import Optimizer

from polyformer.backbone import TokenEmbedding, Transformer, TransformerConfig, weight_count
from polyformer.data.image_text import tokenize
from polyformer.data.tokenizers import Tokenizer
from polyformer.tasks.base import OptimizerConfig, TaskModule
from polyformer.tasks.contrastive_loss import contrastive_loss, gather_uneven, retrieval_recall, topk_hits
from polyformer.models.image_tower import ImageTower


@dataclass
class ImageEncoderConfig:
    """The ViT image tower; defaults are CLIP ViT-B/32's."""

    backbone: TransformerConfig = field(
        default_factory=lambda: TransformerConfig(width=768, depth=12, heads=12, dropout=0.0, position="none")
    )
    image_size: int = 224
    patch_size: int = 32
    channels: int = 3
    pool: Literal["cls", "avg"] = "cls"
    norm_pre: bool = True  # CLIP's ln_pre


@dataclass
class TextEncoderConfig:
    """The causal text tower; backbone.max_len is the context length (CLIP: 77)."""

    backbone: TransformerConfig = field(
        default_factory=lambda: TransformerConfig(
            width=512, depth=12, heads=8, dropout=0.0, position="learned", max_len=77, causal=True
        )
    )

    def __post_init__(self) -> None:
        if not self.backbone.causal:
            # Pooling at end-of-text only ignores the padding after it because later tokens are masked.
            raise ValueError(
                "text.backbone.causal must be true: the text tower pools at end-of-text under a causal mask"
            )


class TextTower(nn.Module):
    """Token embedding + causal Transformer (positions and final norm inside), pooled at the last end-of-text."""

    def __init__(self, cfg: TextEncoderConfig, vocab_size: int, eos_id: int) -> None:
        super().__init__()
        self.eos_id = eos_id
        self.embed = TokenEmbedding(vocab_size, cfg.backbone.width)
        self.encoder = Transformer(cfg.backbone)

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, D)
        x = self.encoder(self.embed(tokens))  # (B, T, D)
        # The last eos, not the first: tokenizers whose bos is also eos (GPT-2 style) start with one.
        is_eos = (tokens == self.eos_id).int()
        last = tokens.shape[1] - 1 - is_eos.flip(1).argmax(dim=1)  # (B,)
        return x[torch.arange(x.shape[0], device=x.device), last]


def clip_init(model: CLIP) -> None:
    """CLIP's initialisation (open_clip `init_parameters`): std width^-0.5 for attention, (2 width)^-0.5 for the MLP's
    first layer, residual projections further scaled by (2 depth)^-0.5, class token and image positions at width^-0.5.
    With GPT-2's fixed 0.02 a narrow image tower starts with a class-token output that barely depends on the image,
    and contrastive training collapses to uniform logits (loss ln B) before it can grow."""
    for tower, cfg in ((model.image.encoder, model.image_cfg.backbone), (model.text.encoder, model.text_cfg.backbone)):
        attn_std, proj_std = cfg.width**-0.5, cfg.width**-0.5 * (2 * cfg.depth) ** -0.5
        for block in tower.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * cfg.width) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
    width = model.image_cfg.backbone.width
    if model.image.patch.cls_token is not None:
        nn.init.normal_(model.image.patch.cls_token, std=width**-0.5)
    if isinstance(model.image.pos_embed, nn.Parameter):
        nn.init.normal_(model.image.pos_embed, std=width**-0.5)
    nn.init.normal_(model.text.embed.weight, std=0.02)
    if model.text.encoder.positions is not None and hasattr(model.text.encoder.positions, "weight"):
        nn.init.normal_(model.text.encoder.positions.weight, std=0.01)
    for proj in (model.image_proj, model.text_proj):
        nn.init.normal_(proj.weight, std=proj.in_features**-0.5)


class CLIP(TaskModule):
    data_links = ("vocab_size", "eos_id")
    architecture_hparams = ("image", "text", "embed_dim", "vocab_size")

    def __init__(
        self,
        image: ImageEncoderConfig | None = None,
        text: TextEncoderConfig | None = None,
        embed_dim: int = 512,
        vocab_size: int | None = None,  # linked from the data's tokenizer
        eos_id: int | None = None,  # linked from the data's tokenizer; the text tower pools here
        init_logit_scale: float = 1 / 0.07,
        max_logit_scale: float = 100.0,
        retrieval_ks: tuple[int, ...] = (1, 5, 10),
        optimizer: OptimizerConfig | None = None,
        compile: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__(optimizer, compile, activation_checkpointing)
        if not 0 < init_logit_scale <= max_logit_scale:
            raise ValueError(f"need 0 < init_logit_scale ({init_logit_scale}) <= max_logit_scale ({max_logit_scale})")
        if not retrieval_ks or min(retrieval_ks) < 1:
            raise ValueError(f"retrieval_ks must be positive ranks such as (1, 5, 10), got {retrieval_ks}")
        self.image_cfg, self.text_cfg = image or ImageEncoderConfig(), text or TextEncoderConfig()
        self.embed_dim, self.vocab_size, self.eos_id = embed_dim, vocab_size, eos_id
        self.init_logit_scale, self.max_logit_scale, self.retrieval_ks = init_logit_scale, max_logit_scale, retrieval_ks
        # Read from the data module in setup() and stored in checkpoints, for zero-shot and the `score` verb.
        self.tokenizer: Tokenizer | None = None
        self.class_names: list[str] | None = None
        self.prompts: list[str] = ["a photo of a {}."]
        self.preprocess: dict[str, Any] = {}
        # For callbacks (W&B media), refreshed after each validation epoch.
        self.zero_shot_per_class: dict[str, float] = {}
        self.retrieval_examples: list[dict[str, Any]] = []
        self._eval: dict[str, list[Tensor]] = {}  # this rank's evaluation embeddings, gathered at epoch end
        self.save_hyperparameters()

    def build(self) -> None:
        ic = self.image_cfg
        self.image = ImageTower(ic.backbone, ic.image_size, ic.patch_size, ic.channels, ic.pool, norm_pre=ic.norm_pre)
        self.text = TextTower(self.text_cfg, self.vocab_size, self.eos_id)
        self.image_proj = nn.Linear(ic.backbone.width, self.embed_dim, bias=False)
        self.text_proj = nn.Linear(self.text_cfg.backbone.width, self.embed_dim, bias=False)
        clip_init(self)
        # Shape (1,), not a scalar: FSDP cannot shard 0-d parameters ("FSDP doesn't support scalar parameters").
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(self.init_logit_scale)))

    def setup(self, stage: str) -> None:
        super().setup(stage)
        dm = self.trainer.datamodule if self._trainer is not None else None
        if dm is not None and getattr(dm, "tokenizer", None) is not None:
            self.tokenizer, self.class_names = dm.tokenizer, dm.class_names
            self.prompts = list(dm.prompts)
            self.preprocess = {"image_size": dm.image_size, "channels": dm.channels, "mean": dm.mean, "std": dm.std}

    # ---- model ------------------------------------------------------------------------------------------------
    def encode_image(self, images: Tensor) -> Tensor:  # (B, C, H, W) -> (B, E), unit norm
        return F.normalize(self.image_proj(self.image(images)), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, E), unit norm
        return F.normalize(self.text_proj(self.text(tokens)), dim=-1)

    def scale(self) -> Tensor:
        """exp(logit_scale), never above max_logit_scale. The cap acts on the value only and the gradient passes
        straight through: with a plain clamp here the gradient above the cap is exactly 0 and a parameter that got
        there could never come back down. Training keeps the parameter itself under the cap by clamping it in place
        after every optimizer step (`optimizer_step`, as open_clip does), so there this is simply exp; the value cap
        still protects evaluation and `score` from checkpoints whose parameter is beyond it."""
        log_scale = self.logit_scale
        capped = log_scale.clamp(max=math.log(self.max_logit_scale))
        return (log_scale + (capped - log_scale).detach()).exp().squeeze(0)  # () scalar

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return self.encode_image(images), self.encode_text(tokens), self.scale()

    def similarity(self, images: Tensor, tokens: Tensor) -> Tensor:
        """Scaled cosine similarities (B images, B' texts), as the loss sees them (for similarity-matrix plots)."""
        image, text, scale = self(images, tokens)
        return scale * image @ text.T

    @torch.no_grad()
    def score(self, images: Tensor, texts: list[str]) -> Tensor:
        """Probabilities (B, len(texts)) that each preprocessed image matches each text: softmax over the texts."""
        if self.tokenizer is None:
            raise ValueError("this CLIP model has no tokenizer: train it with a data module or load a checkpoint")
        tokens = tokenize(self.tokenizer, texts, self.text_cfg.backbone.max_len).to(self.device)
        return self.similarity(images.to(self.device), tokens).softmax(dim=-1)

    @torch.no_grad()
    def class_embeddings(self, class_names: list[str], prompts: list[str]) -> Tensor:
        """Zero-shot classifier (C, E): each class's prompt embeddings averaged, then renormalised (open_clip)."""
        texts = [p.format(c) for c in class_names for p in prompts]  # C * P, class-major
        tokens = tokenize(self.tokenizer, texts, self.text_cfg.backbone.max_len).to(self.device)
        emb = torch.cat([self.encode_text(t) for t in tokens.split(256)])  # (C * P, E)
        return F.normalize(emb.view(len(class_names), len(prompts), -1).mean(dim=1), dim=-1)

    # ---- training ---------------------------------------------------------------------------------------------
    def training_flops(self, batch: dict[str, Tensor]) -> float:
        images, tokens = batch["image"], batch["text"]
        projections = weight_count(self.image_proj) * images.shape[0] + weight_count(self.text_proj) * tokens.shape[0]
        # The (B, B x world) similarity matrix is left out: it is tiny beside the towers.
        return self.image.training_flops(images) + self.text.encoder.training_flops(*tokens.shape) + 6.0 * projections

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        image, text, scale = self(batch["image"], batch["text"])
        loss = contrastive_loss(image, text, scale)
        self.log("train/loss", loss, prog_bar=True, sync_dist=True)  # mean over ranks = the global-batch loss
        self.log("train/logit_scale", scale.detach())
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
            self.logit_scale.clamp_(max=math.log(self.max_logit_scale))

    # ---- evaluation -------------------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._eval = {"image": [], "text": [], "tokens": [], "label": []}

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int, prefix: str = "val") -> None:
        image, text, scale = self(batch["image"], batch["text"])
        in_batch = F.cross_entropy(scale * image @ text.T, torch.arange(len(image), device=self.device))
        self.log(f"{prefix}/loss", in_batch, sync_dist=True)  # image->text within each evaluation batch
        for key, value in (("image", image), ("text", text), ("tokens", batch["text"]), ("label", batch["label"])):
            self._eval[key].append(value)

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.evaluate("val"), sync_dist=False)  # identical on every rank: computed on gathered data

    def on_test_epoch_start(self) -> None:
        self.on_validation_epoch_start()

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx, prefix="test")

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.evaluate("test"), sync_dist=False)

    def evaluate(self, prefix: str) -> dict[str, float]:
        """Zero-shot top-1/top-5 and retrieval recall@K over the whole evaluation set, gathered from all ranks."""
        data = {k: gather_uneven(torch.cat(v)) for k, v in self._eval.items()}  # each (N, ...)
        _, group = torch.unique(data["tokens"], dim=0, return_inverse=True)  # identical captions share a group
        recall = retrieval_recall(data["image"], data["text"], group, self.retrieval_ks)
        metrics = {f"{prefix}/{k}": v for k, v in recall.items()}
        self.retrieval_examples = self._retrieval_examples(data)
        labels = data["label"]
        if self.class_names and self.tokenizer is not None and bool((labels >= 0).all()):
            classifier = self.class_embeddings(self.class_names, self.prompts)  # (C, E)
            logits = data["image"] @ classifier.T  # (N, C)
            hits = topk_hits(logits, labels, (1, 5))
            metrics[f"{prefix}/zero_shot_top1"] = hits[1].float().mean().item()
            metrics[f"{prefix}/zero_shot_top5"] = hits[5].float().mean().item()
            self.zero_shot_per_class = {
                name: hits[1][labels == c].float().mean().item()
                for c, name in enumerate(self.class_names)
                if bool((labels == c).any())
            }
        return metrics

    def _retrieval_examples(self, data: dict[str, Tensor], n: int = 8, k: int = 3) -> list[dict[str, Any]]:
        """The top-k retrieved captions of the first n evaluation images (gathered order), for media callbacks."""
        if self.tokenizer is None:
            return []
        sim = data["image"][:n].float() @ data["text"].float().T  # (n, N)
        top = sim.topk(min(k, sim.shape[1]), dim=1)

        def decode(ids: list[int]) -> str:  # up to the last end-of-text: the zeros after it are padding
            end = len(ids) - ids[::-1].index(self.eos_id) if self.eos_id in ids else len(ids)
            return self.tokenizer.decode(ids[:end])

        return [
            {
                "caption": decode(data["tokens"][i].tolist()),
                "retrieved": [decode(data["tokens"][j].tolist()) for j in top.indices[i].tolist()],
                "scores": top.values[i].tolist(),
            }
            for i in range(len(top.indices))
        ]

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
        state = checkpoint.get("state_dict", {})
        if "logit_scale" in state and state["logit_scale"].ndim == 0:  # written before it became (1,)
            state["logit_scale"] = state["logit_scale"].reshape(1)
