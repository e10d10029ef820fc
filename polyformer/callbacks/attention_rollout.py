"""Where an image transformer looks: the pooling token's attention over the patch grid, per layer and rolled out
through all layers (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers", section 3), drawn as a heat
overlay on the input image.

Rollout: each layer's head-averaged weights A_l get the residual connection as an identity, A'_l = 0.5 A_l + 0.5 I,
rows renormalised; the product R = A'_L ... A'_1 says how much each input token reaches each output token. The row of
the pooling token (the class token) over the patch columns, reshaped to the grid, is the map. A tower pooled by the
mean of its outputs has no such token: there the map is the mean of the patch rows, which is what the average
attributes to each input (the same linear reading the class token's row has for a class-token tower).

Legend: L layers, n images, T query tokens, S key tokens (T = S: self-attention), g/gh/gw grid sides.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

Image = np.ndarray  # (H, W, 3) uint8


def attention_rollout(layers: Sequence[Tensor]) -> Tensor:
    """Head-averaged self-attention of each layer, first layer first, each (n, T, T) -> the rollout (n, T, T)."""
    rolled: Tensor | None = None
    for a in layers:
        a = 0.5 * a.float() + 0.5 * torch.eye(a.shape[-1], device=a.device)
        a = a / a.sum(dim=-1, keepdim=True)  # the rows of a softmax sum to 1 already; a cropped map's do not
        rolled = a if rolled is None else a @ rolled  # a later layer reads the earlier layers' mixture
    if rolled is None:
        raise ValueError("attention_rollout needs at least one layer")
    return rolled


def patch_map(attention: Tensor, prefix: int, grid: tuple[int, int], query: int | None) -> Tensor:
    """(n, T, S) weights -> (n, gh, gw): the `query` token's row (None: the mean of the patch rows) over the patch
    columns, which start after `prefix` tokens (class token, registers)."""
    gh, gw = grid
    if attention.shape[-1] != prefix + gh * gw:
        raise ValueError(f"{attention.shape[-1]} key tokens are not {prefix} prefix tokens + a {gh}x{gw} patch grid")
    rows = attention[:, query] if query is not None else attention[:, prefix:].mean(dim=1)  # (n, S)
    return rows[:, prefix:].unflatten(-1, (gh, gw)).float()


def heat_overlay(image: Image, heat: Tensor, alpha: float = 0.55, cmap: str = "jet") -> Image:
    """Blend a colour-mapped (gh, gw) map, min-max scaled and bilinearly upsampled to the image's size, over the
    (H, W, 3) uint8 image. The colour's weight grows with the heat, so where the map is low the image stays as it
    is and the digit or object under the hot patches stays visible."""
    from matplotlib import colormaps

    h = heat.float()
    h = (h - h.min()) / (h.max() - h.min()).clamp_min(1e-8)
    h = F.interpolate(h[None, None], size=image.shape[:2], mode="bilinear", align_corners=False)[0, 0].clamp(0, 1)
    h = h.numpy()[..., None]  # (H, W, 1)
    colour = colormaps[cmap](h[..., 0])[..., :3]  # (H, W, 3) in [0, 1]
    weight = alpha * (0.25 + 0.75 * h)  # a faint tint everywhere shows the map's extent; the hot parts dominate
    out = (1 - weight) * image.astype(np.float32) / 255 + weight * colour
    return (out.clip(0, 1) * 255).round().astype(np.uint8)
