"""Under `precision: bf16-true` Lightning builds the model with bf16 as the default dtype and then casts it
(`HalfPrecision.module_init_context` + `convert_module`). Position tables and rotary frequencies are derived values,
not weights: they must stay the fp32 formula whatever the module's dtype. Before, the sinusoid table and the rotary
frequencies were computed in bf16 (errors ~0.25 at position 100, ~1.5 at position 1000, width 512), far beyond the
bf16 rounding of an input embedding (~0.004)."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch.plugins.precision import HalfPrecision

from polyformer.backbone import Transformer, TransformerConfig
from polyformer.backbone.positional import apply_rotary
from polyformer.models.image_tower import ImageTower

POSITIONS = torch.tensor([[0, 1, 100, 1000, 2047]])


def exact_sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:  # float64, the paper's formula
    i = torch.arange(0, dim, 2, dtype=torch.float64)
    angles = positions.double()[..., None] / 10000 ** (i / dim)
    return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)


def build_bf16_true(cfg: TransformerConfig) -> Transformer:
    plugin = HalfPrecision("bf16-true")
    with plugin.module_init_context():
        model = Transformer(cfg)
    return plugin.convert_module(model)


def test_sinusoid_table_stays_exact_under_bf16_true():
    model = build_bf16_true(TransformerConfig(width=512, depth=1, heads=8, max_len=2048))
    assert next(model.parameters()).dtype == torch.bfloat16
    table = model.positions(POSITIONS, end=2048)
    error = (table.double() - exact_sinusoid(POSITIONS, 512)).abs().amax(dim=-1)[0]
    print("max |error| at positions", POSITIONS.tolist(), "=", error.tolist())
    assert table.dtype == torch.float32 and error.max() < 5e-4  # float32 angles: ~6e-8 x position


@pytest.mark.parametrize("position", [1000, 4096])  # inside and beyond the table
def test_sinusoid_beyond_the_table_is_exact_too(position):
    model = build_bf16_true(TransformerConfig(width=64, depth=1, heads=2, max_len=16))
    table = model.positions(torch.tensor([[position]]), end=position + 1)
    assert (table.double() - exact_sinusoid(torch.tensor([[position]]), 64)).abs().max() < 1e-3


def test_rotary_frequencies_stay_exact_under_bf16_true():
    cfg = TransformerConfig(width=512, depth=1, heads=8, position="rotary", causal=True)
    model = build_bf16_true(cfg)
    cos, sin = model.rope(POSITIONS)
    head = cfg.head_dim
    inv_freq = 10000.0 ** (-torch.arange(0, head, 2, dtype=torch.float64) / head)
    angles = POSITIONS.double()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)
    error = max((cos.double() - angles.cos()).abs().max().item(), (sin.double() - angles.sin()).abs().max().item())
    print(f"rotary max |error| = {error:.2e}")
    assert error < 1e-3
    # The rotation itself is done in fp32 and rounded once: a bf16 query keeps its norm to bf16 rounding.
    q = torch.randn(1, 1, POSITIONS.shape[1], head).bfloat16()
    rotated = apply_rotary(q, cos, sin)
    assert rotated.dtype == torch.bfloat16
    torch.testing.assert_close(rotated.float().norm(dim=-1), q.float().norm(dim=-1), rtol=1e-2, atol=0)


def test_sincos2d_image_positions_stay_exact_under_bf16_true():
    plugin = HalfPrecision("bf16-true")
    cfg = TransformerConfig(width=256, depth=1, heads=4, position="none")
    with plugin.module_init_context():
        tower = ImageTower(cfg, image_size=512, patch_size=8, channels=3, position="sincos2d")
    tower = plugin.convert_module(tower)
    with torch.device("cpu"):
        reference = ImageTower(cfg, image_size=512, patch_size=8, channels=3, position="sincos2d").pos_embed
    assert tower.pos_embed.dtype == torch.float32
    assert (tower.pos_embed - reference).abs().max() < 1e-6


def test_positions_follow_the_module_to_another_device_and_back():
    model = Transformer(TransformerConfig(width=32, depth=1, heads=2, max_len=64))
    model.double().float()  # any cast round trip: the derived table is recomputed, never rounded
    assert model.positions.table.dtype == torch.float32
    torch.testing.assert_close(model.positions.table.double(), exact_sinusoid(torch.arange(64), 32), atol=1e-5, rtol=0)
    assert math.isfinite(model.positions.table.sum().item())
