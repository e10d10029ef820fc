"""Positional encodings: the paper's sinusoids (section 3.5), learned tables (GPT-2, ViT) and rotary (Su et al. 2021).

Legend: B batch, T positions, D width, H heads, Dh head dim.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal(positions: Tensor, dim: int, base: float = 10000.0) -> Tensor:
    """PE(pos, 2i) = sin(pos / base^(2i/d)), PE(pos, 2i+1) = cos(pos / base^(2i/d)); any shape of positions."""
    # float32 explicitly: under bf16-true the default dtype is bf16, whose frequencies are ~0.25 rad off at pos 100
    steps = torch.arange(0, dim, 2, device=positions.device, dtype=torch.float32)
    inv_freq = torch.exp(-math.log(base) * steps / dim)
    angles = positions.float().unsqueeze(-1) * inv_freq  # (..., D/2)
    pe = torch.stack([angles.sin(), angles.cos()], dim=-1)  # interleave: even dims sin, odd dims cos
    return pe.flatten(-2)[..., :dim]


class FixedTable(nn.Module):
    """A module whose buffers are derived from a formula, not learned. After any move or cast (`.to(bf16)` under
    `precision: bf16-true`, `to_empty` after meta-device init) they are recomputed in float32 on the new device
    instead of being kept as a rounded copy: positions are exact whatever the module's dtype."""

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        self.derive(next(self.buffers()).device)
        return self

    def derive(self, device: torch.device) -> None:
        raise NotImplementedError


class SinusoidalPositions(FixedTable):
    def __init__(self, dim: int, max_len: int) -> None:
        super().__init__()
        self.dim, self.max_len = dim, max_len
        self.register_buffer("table", torch.empty(0), persistent=False)
        self.derive(self.table.device)  # wherever modules are being built (a device context, meta)

    def derive(self, device: torch.device) -> None:
        self.table = sinusoidal(torch.arange(self.max_len, device=device), self.dim)  # (max_len, D) float32

    def forward(self, positions: Tensor, end: int) -> Tensor:  # (B, T) -> (B, T, D); every position < end
        if end <= self.table.shape[0]:
            return self.table[positions]
        return sinusoidal(positions, self.dim)  # beyond the table: the formula holds for any position


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


class RotaryPositions(FixedTable):
    """Returns float32 (cos, sin) for the positions; attention rotates q and k with them (the half-split layout)."""

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.head_dim, self.base = head_dim, base
        self.register_buffer("inv_freq", torch.empty(0), persistent=False)
        self.derive(self.inv_freq.device)

    def derive(self, device: torch.device) -> None:
        steps = torch.arange(0, self.head_dim, 2, device=device, dtype=torch.float32)
        self.inv_freq = self.base ** (-steps / self.head_dim)

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:  # (B, T) -> 2 x (B, 1, T, Dh)
        angles = positions.float().unsqueeze(-1) * self.inv_freq
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
        return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i+Dh/2}) by the position's angle: q·k then depends only on the offset."""
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)
