"""The ViT image tower (Dosovitskiy et al. 2020) shared by image classification and CLIP: patches, an optional class
token, positions, the shared Transformer, pooling. Positions are owned here (not by the backbone) because they are
2D: a checkpoint trained at one resolution is used at another by interpolating the grid (`resize_pos_embed`).

Legend: B batch, C channels, N patches, D width, g grid side.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polyformer.backbone import PatchEmbedding, Transformer, TransformerConfig, sinusoidal, weight_count


def sincos_2d(grid: int, dim: int) -> Tensor:
    """Fixed 2D sin-cos positions (MAE / "Better plain ViT baselines"): half the channels encode rows, half columns."""
    if dim % 4:
        raise ValueError(f"2D sin-cos positions need a width divisible by 4, got {dim}")
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    return torch.cat([sinusoidal(ys.flatten(), dim // 2), sinusoidal(xs.flatten(), dim // 2)], dim=-1)  # (N, D)


def resize_pos_embed(pos: Tensor, new_grid: int, prefix_tokens: int) -> Tensor:
    """Bicubic resize of a (1, prefix + g*g, D) position table to new_grid x new_grid, keeping prefix tokens."""
    prefix, grid_pos = pos[:, :prefix_tokens], pos[:, prefix_tokens:]
    old = math.isqrt(grid_pos.shape[1])
    if old == new_grid:
        return pos
    grid_pos = grid_pos.reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, D, g, g)
    grid_pos = F.interpolate(grid_pos.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    return torch.cat([prefix, grid_pos.permute(0, 2, 3, 1).flatten(1, 2).to(pos.dtype)], dim=1)


class ImageTower(nn.Module):
    def __init__(
        self,
        backbone: TransformerConfig,
        image_size: int = 224,
        patch_size: int = 16,
        channels: int = 3,
        pool: Literal["cls", "avg"] = "cls",
        position: Literal["learned", "sincos2d"] = "learned",
        norm_pre: bool = False,  # a norm before the blocks: OpenAI/open_clip ViTs have one (ln_pre)
        patch_bias: bool = True,  # OpenAI/open_clip patch convolutions have none
    ) -> None:
        super().__init__()
        if backbone.causal or backbone.cross_attention:
            raise ValueError("the image tower is an encoder: backbone.causal and cross_attention must be false")
        self.pool = pool
        self.patch = PatchEmbedding(
            image_size, patch_size, channels, backbone.width, class_token=pool == "cls", bias=patch_bias
        )
        self.prefix = int(pool == "cls")
        if position == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, self.patch.num_tokens, backbone.width) * 0.02)
        else:
            self.register_buffer("pos_embed", self._sincos_table(torch.device("cpu")), persistent=False)
        self.norm_pre = nn.LayerNorm(backbone.width, eps=backbone.norm_eps) if norm_pre else nn.Identity()
        self.encoder = Transformer(dataclasses.replace(backbone, position="none"))
        # With average pooling the encoder's final norm moves after the pooling (timm's fc_norm).
        self.norm_post = nn.Identity()
        if pool == "avg" and backbone.final_norm and backbone.prenorm:
            self.norm_post, self.encoder.norm = self.encoder.norm, nn.Identity()

    def _sincos_table(self, device: torch.device) -> Tensor:  # (1, prefix + N, D) float32
        width = self.patch.proj.out_channels
        grid = sincos_2d(self.patch.grid, width).to(device)
        return torch.cat([torch.zeros(self.prefix, width, device=device), grid])[None]

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # Fixed 2D sin-cos positions are a formula, not weights: recompute them in float32 after any move or cast
        # (bf16-true casts every buffer) instead of keeping a rounded copy; see backbone.positional.FixedTable.
        super()._apply(fn, recurse)
        if not isinstance(self.pos_embed, nn.Parameter):
            self.pos_embed = self._sincos_table(self.patch.proj.weight.device)
        return self

    def forward(self, images: Tensor) -> Tensor:  # (B, C, H, W) -> (B, D)
        x = self.tokens(images)
        return self.norm_post(x[:, 0] if self.pool == "cls" else x.mean(dim=1))

    def training_flops(self, images: Tensor) -> float:
        """Training FLOPs of this tower on a batch shaped like `images` (see `Transformer.training_flops`). The patch
        projection is a matrix multiply per patch at 4, not 6, FLOPs per weight: pixels need no gradient."""
        B, (H, W), p = images.shape[0], images.shape[-2:], self.patch.patch_size
        patches = (H // p) * (W // p)
        projection = 4.0 * weight_count(self.patch.proj) * B * patches
        return projection + self.encoder.training_flops(B, patches + self.prefix)

    def tokens(self, images: Tensor) -> Tensor:
        """Every output token (B, [1 +] N, D), for attention maps and dense uses."""
        x = self.patch(images)
        pos = self.pos_embed
        if x.shape[1] != pos.shape[1]:  # another resolution than the table was made for
            pos = resize_pos_embed(pos, math.isqrt(x.shape[1] - self.prefix), self.prefix)
        return self.encoder(self.norm_pre(x + pos))
