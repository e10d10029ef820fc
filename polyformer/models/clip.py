"""CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision"): an image tower
and a text tower from the shared backbone, each projected into one embedding space, and a learned temperature.

Image tower: the ViT of image classification (`ImageTower`), class-token pooled. Text tower: the backbone with a
causal mask, learned positions and the final norm, pooled at the end-of-text token. The logit scale starts at
`init_logit_scale` (the paper: 1/0.07) and is capped at `max_logit_scale` (100, section 2.5). With `loss="siglip"`
(Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training") the model also learns a logit bias b, starting at
`init_logit_bias` (-10: the paper's start, against the heavy imbalance of one positive per N - 1 negatives), and a
pair's logit is t * cos + b.

Plain PyTorch: `polyformer.tasks.contrastive.CLIP` trains it (the contrastive loss gathered across ranks, zero-shot
and retrieval evaluation, the in-place clamp of the logit scale after each optimizer step);
`polyformer.weights.open_clip` loads open_clip and Hugging Face `CLIPModel` weights into it.

Legend: B batch, T context, D tower width, E embedding dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyformer.backbone import TokenEmbedding, Transformer, TransformerConfig, weight_count
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

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "channels"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.image.{name} must be >= 1, got {getattr(self, name)}")
        if self.pool not in ("cls", "avg"):
            raise ValueError(f"model.image.pool must be 'cls' or 'avg', got {self.pool!r}")


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
                "model.text.backbone.causal must be true: the text tower pools at end-of-text under a causal mask"
            )


def check_logit_scale(init_logit_scale: float, max_logit_scale: float) -> None:
    """ValueError unless 0 < init <= max. `CLIPConfig` checks it; the task calls it too, so a wrong preset fails
    before the data module prepares its data."""
    if not 0 < init_logit_scale <= max_logit_scale:
        raise ValueError(
            f"need 0 < model.init_logit_scale ({init_logit_scale}) <= model.max_logit_scale ({max_logit_scale})"
        )


@dataclass
class CLIPConfig:
    image: ImageEncoderConfig
    text: TextEncoderConfig
    embed_dim: int
    vocab_size: int
    eos_id: int  # the text tower pools at the last occurrence of this token
    init_logit_scale: float = 1 / 0.07
    max_logit_scale: float = 100.0
    loss: Literal["clip", "siglip"] = "clip"  # siglip: sigmoid per pair, with a learned logit bias
    init_logit_bias: float = -10.0  # siglip only

    def __post_init__(self) -> None:
        if self.loss not in ("clip", "siglip"):
            raise ValueError(f"model.loss must be 'clip' or 'siglip', got {self.loss!r}")
        for name in ("embed_dim", "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.eos_id < self.vocab_size:
            raise ValueError(f"model.eos_id must be a token id below vocab_size ({self.vocab_size}), got {self.eos_id}")
        check_logit_scale(self.init_logit_scale, self.max_logit_scale)


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
    cfg = model.cfg
    for tower, tower_cfg in ((model.image.encoder, cfg.image.backbone), (model.text.encoder, cfg.text.backbone)):
        attn_std = tower_cfg.width**-0.5
        proj_std = tower_cfg.width**-0.5 * (2 * tower_cfg.depth) ** -0.5
        for block in tower.blocks:
            nn.init.normal_(block.attn.qkv.weight, std=attn_std)
            nn.init.normal_(block.attn.proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.fc1.weight, std=(2 * tower_cfg.width) ** -0.5)
            nn.init.normal_(block.mlp.fc2.weight, std=proj_std)
    width = cfg.image.backbone.width
    if model.image.patch.cls_token is not None:
        nn.init.normal_(model.image.patch.cls_token, std=width**-0.5)
    if isinstance(model.image.pos_embed, nn.Parameter):
        nn.init.normal_(model.image.pos_embed, std=width**-0.5)
    nn.init.normal_(model.text.embed.weight, std=0.02)
    if model.text.encoder.positions is not None and hasattr(model.text.encoder.positions, "weight"):
        nn.init.normal_(model.text.encoder.positions.weight, std=0.01)
    for proj in (model.image_proj, model.text_proj):
        nn.init.normal_(proj.weight, std=proj.in_features**-0.5)


class CLIP(nn.Module):
    """(B, C, H, W) images and (B', T) token ids -> unit-norm embeddings (B, E), (B', E) and the logit scale."""

    def __init__(self, cfg: CLIPConfig) -> None:
        super().__init__()
        self.cfg = cfg
        ic = cfg.image
        # Towers, projections, the init, then the logit scale: the order the RNG is drawn in (and the state-dict keys)
        # of the task that built them before, so seeded runs and the golden curve are unchanged.
        self.image = ImageTower(ic.backbone, ic.image_size, ic.patch_size, ic.channels, ic.pool, norm_pre=ic.norm_pre)
        self.text = TextTower(cfg.text, cfg.vocab_size, cfg.eos_id)
        self.image_proj = nn.Linear(ic.backbone.width, cfg.embed_dim, bias=False)
        self.text_proj = nn.Linear(cfg.text.backbone.width, cfg.embed_dim, bias=False)
        clip_init(self)
        # Shape (1,), not a scalar: FSDP cannot shard 0-d parameters ("FSDP doesn't support scalar parameters").
        self.logit_scale = nn.Parameter(torch.full((1,), math.log(cfg.init_logit_scale)))
        # SigLIP's bias b: a parameter only where the loss uses it, so CLIP's state dict is unchanged.
        self.logit_bias = nn.Parameter(torch.full((1,), cfg.init_logit_bias)) if cfg.loss == "siglip" else None

    def encode_image(self, images: Tensor) -> Tensor:  # (B, C, H, W) -> (B, E), unit norm
        return F.normalize(self.image_proj(self.image(images)), dim=-1)

    def encode_text(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, E), unit norm
        return F.normalize(self.text_proj(self.text(tokens)), dim=-1)

    def scale(self) -> Tensor:
        """exp(logit_scale), never above max_logit_scale. The cap acts on the value only and the gradient passes
        straight through: with a plain clamp here the gradient above the cap is exactly 0 and a parameter that got
        there could never come back down. Training keeps the parameter itself under the cap by clamping it in place
        after every optimizer step (the task's `optimizer_step`, as open_clip does), so there this is simply exp; the
        value cap still protects evaluation and scoring from weights whose parameter is beyond it."""
        log_scale = self.logit_scale
        capped = log_scale.clamp(max=math.log(self.cfg.max_logit_scale))
        return (log_scale + (capped - log_scale).detach()).exp().squeeze(0)  # () scalar

    def bias(self) -> Tensor:
        """The pair logits' bias as a () scalar: SigLIP's learned b, 0 for CLIP (whose softmax ignores a shift)."""
        if self.logit_bias is None:
            return self.logit_scale.new_zeros(())
        return self.logit_bias.squeeze(0)

    def forward(self, images: Tensor, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(image embeddings (B, E), text embeddings (B', E), scale ()): what the contrastive loss takes."""
        return self.encode_image(images), self.encode_text(tokens), self.scale()

    def similarity(self, images: Tensor, tokens: Tensor) -> Tensor:
        """Pair logits (B images, B' texts) as the loss sees them: t * cos (+ b for SigLIP)."""
        image, text, scale = self(images, tokens)
        return scale * image @ text.T + self.bias()

    def training_flops(self, images: Tensor, tokens: Tensor) -> float:
        """Forward + backward FLOPs on a batch shaped like `images` and `tokens`: both towers', and 6 per projection
        weight per input. The (B, B x world) similarity matrix is left out: it is tiny beside the towers."""
        projections = weight_count(self.image_proj) * images.shape[0] + weight_count(self.text_proj) * tokens.shape[0]
        return self.image.training_flops(images) + self.text.encoder.training_flops(*tokens.shape) + 6.0 * projections
