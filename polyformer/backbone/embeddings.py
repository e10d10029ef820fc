"""Input embeddings: tokens (section 3.4: scaled by sqrt(d), tied with the output projection) and image patches
(Dosovitskiy et al. 2020, ViT: a convolution with stride = kernel = patch size, plus an optional class token).

Legend: B batch, T tokens, D width, C channels, N patches.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class TokenEmbedding(nn.Module):
    def __init__(self, vocab_size: int, width: int, scale: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, width))
        nn.init.normal_(self.weight, std=0.02)
        self.scale = math.sqrt(width) if scale else 1.0

    def forward(self, tokens: Tensor) -> Tensor:  # (B, T) -> (B, T, D)
        x = nn.functional.embedding(tokens, self.weight)
        return x * self.scale if self.scale != 1.0 else x


class PatchEmbedding(nn.Module):
    def __init__(
        self, image_size: int, patch_size: int, channels: int, width: int, class_token: bool = True, bias: bool = True
    ) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size ({image_size}) must be divisible by patch_size ({patch_size}); "
                f"e.g. patch_size in {[p for p in range(1, image_size + 1) if image_size % p == 0]}"
            )
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.proj = nn.Conv2d(channels, width, kernel_size=patch_size, stride=patch_size, bias=bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if class_token else None

    @property
    def num_tokens(self) -> int:
        return self.grid**2 + (self.cls_token is not None)

    def forward(self, images: Tensor) -> Tensor:  # (B, C, H, W) -> (B, [1 +] N, D)
        if images.shape[-1] % self.patch_size or images.shape[-2] % self.patch_size:
            raise ValueError(f"image size {tuple(images.shape[-2:])} is not divisible by patch_size {self.patch_size}")
        x = self.proj(images).flatten(2).transpose(1, 2)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x
