"""ViT image classifier (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words"): the shared `ImageTower` (patches,
class token or average pooling, positions, encoder) and a linear head on its pooled output.

Plain PyTorch: `polyformer.tasks.image_classification.ImageClassifier` trains it (loss, Mixup, metrics, media);
`polyformer.weights.timm_vit` loads timm VisionTransformer weights into it.

Legend: B batch, C channels, H/W image side, K classes, D width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from polyformer.backbone import TransformerConfig, weight_count
from polyformer.models.image_tower import ImageTower


@dataclass
class ViTConfig:
    backbone: TransformerConfig
    image_size: int  # the side the position table is made for; other sides interpolate it
    patch_size: int
    channels: int
    num_classes: int
    pool: Literal["cls", "avg"] = "cls"
    position: Literal["learned", "sincos2d"] = "learned"
    norm_pre: bool = False  # a norm before the blocks (CLIP-style pre-norm timm ViTs)

    def __post_init__(self) -> None:
        for name in ("image_size", "patch_size", "channels", "num_classes"):
            if getattr(self, name) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.pool not in ("cls", "avg"):
            raise ValueError(f"model.pool must be 'cls' or 'avg', got {self.pool!r}")
        if self.position not in ("learned", "sincos2d"):
            raise ValueError(f"model.position must be 'learned' or 'sincos2d', got {self.position!r}")


class ViT(nn.Module):
    """(B, C, H, W) images -> (B, K) logits."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Tower first, then the head: the order the RNG is drawn in (and the state-dict keys) of the task that built
        # them before, so seeded runs and the golden curve are unchanged.
        self.tower = ImageTower(
            cfg.backbone, cfg.image_size, cfg.patch_size, cfg.channels, cfg.pool, cfg.position, cfg.norm_pre
        )
        self.head = nn.Linear(cfg.backbone.width, cfg.num_classes)
        # timm's N(0, 0.02), not the JAX zero head: with a zero head the tower gets no gradient at first, and small
        # ViTs sat at loss ln K for ~100 steps on the digits.
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    def forward(self, images: Tensor) -> Tensor:  # (B, C, H, W) -> (B, K) logits
        return self.head(self.tower(images))

    def training_flops(self, images: Tensor) -> float:
        """Forward + backward FLOPs on a batch shaped like `images`: the tower's, and 6 per head weight per image."""
        return self.tower.training_flops(images) + 6.0 * weight_count(self.head) * images.shape[0]
