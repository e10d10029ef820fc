"""Positional encodings: the paper's sinusoid formula, and rotary scores that depend only on the offset."""

import math

import torch

from polyformer.backbone import Transformer, TransformerConfig, sinusoidal
from polyformer.backbone.positional import RotaryPositions, SinusoidalPositions, apply_rotary


def test_sinusoidal_equals_the_paper_formula():
    d, n = 16, 50
    pe = sinusoidal(torch.arange(n), d)
    for pos in (0, 1, 7, 49):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert math.isclose(pe[pos, 2 * i].item(), math.sin(angle), abs_tol=1e-5)
            assert math.isclose(pe[pos, 2 * i + 1].item(), math.cos(angle), abs_tol=1e-5)


def test_sinusoidal_works_beyond_the_precomputed_table():
    table = SinusoidalPositions(8, max_len=4)
    positions = torch.arange(10)[None]
    torch.testing.assert_close(table(positions, end=10)[0], sinusoidal(torch.arange(10), 8))


def test_rotary_scores_depend_only_on_relative_offset():
    torch.manual_seed(0)
    rope = RotaryPositions(head_dim=8, base=10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m: int, n: int) -> float:
        cos_m, sin_m = rope(torch.tensor([[m]]))
        cos_n, sin_n = rope(torch.tensor([[n]]))
        return (apply_rotary(q, cos_m, sin_m) * apply_rotary(k, cos_n, sin_n)).sum().item()

    for offset in (0, 3, 11):
        ref = score(offset, 0)
        for start in (1, 5, 40, 1000):
            assert math.isclose(score(start + offset, start), ref, rel_tol=1e-4, abs_tol=1e-4)
    assert not math.isclose(score(3, 0), score(4, 0), rel_tol=1e-3)


def test_rotary_preserves_norm():
    rope = RotaryPositions(head_dim=8, base=10000.0)
    x = torch.randn(2, 3, 5, 8)
    cos, sin = rope(torch.arange(5)[None])
    torch.testing.assert_close(apply_rotary(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_learned_positions_reject_inputs_beyond_the_table():
    model = Transformer(TransformerConfig(width=16, heads=2, depth=1, position="learned", max_len=4))
    try:
        model(torch.randn(1, 5, 16))
    except ValueError as e:
        assert "max_len" in str(e)
    else:
        raise AssertionError("expected a ValueError for 5 positions with max_len=4")
