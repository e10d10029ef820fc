"""Positional encodings: the paper's sinusoids (section 3.5), learned tables (GPT-2, ViT) and rotary (Su et al. 2021).

Legend: B batch, T positions, D width, H heads, Dh head dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """PE(pos, 2i) = sin(pos / base^(2i/d)), PE(pos, 2i+1) = cos(pos / base^(2i/d)); any shape of positions."""
    inv_freq = torch.exp(-math.log(base) * torch.arange(0, dim, 2, device=positions.device) / dim)
    angles = positions.float().unsqueeze(-1) * inv_freq  # (..., D/2)
    pe = torch.stack([angles.sin(), angles.cos()], dim=-1)  # interleave: even dims sin, odd dims cos
    return pe.flatten(-2)[..., :dim]


class SinusoidalPositions(nn.Module):
    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.dim = dim
        self.register_buffer("table", sinusoidal(torch.arange(max_len), dim), persistent=False)

    def forward(self, positions: Tensor, end: int) -> Tensor:  # (B, T) -> (B, T, D); every position < end
        if end <= self.table.shape[0]:
            return self.table[positions]
        return sinusoidal(positions, self.dim).to(self.table.dtype)  # beyond the table: the formula holds for any pos


class LearnedPositions(nn.Module):
    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_len, dim))

    def forward(self, positions: Tensor, end: int) -> Tensor:
        # `end` bounds the positions without reading them back from the device (no sync, no graph break).
        if end > self.weight.shape[0]:
            raise ValueError(
                f"{end} positions do not fit the learned table of {self.weight.shape[0]} (backbone.max_len); "
                "raise backbone.max_len or shorten the input"
            )
        return self.weight[positions]


class RotaryPositions(nn.Module):
    """Returns (cos, sin) for the positions; attention rotates q and k with them (the half-split layout)."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.register_buffer("inv_freq", base ** (-torch.arange(0, head_dim, 2).float() / head_dim), persistent=False)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:  # (B, T) -> 2 x (B, 1, T, Dh)
        angles = positions.float().unsqueeze(-1) * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+Dh/2}) by the position's angle: q·k then depends only on the offset."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
