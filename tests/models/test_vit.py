"""The plain ViT (`polyformer.models.vit`) without Lightning: builds from its config, runs forward and backward,
draws the RNG as the task used to (tower, then head), counts its FLOPs, and refuses bad configs by key."""

import pytest
import torch
from torch import nn

from polyformer.backbone import TransformerConfig, weight_count
from polyformer.models.image_tower import ImageTower
from polyformer.models.vit import ViT, ViTConfig

TINY = TransformerConfig(width=32, depth=2, heads=2, dropout=0.0)


@pytest.mark.parametrize("pool, position", [("cls", "learned"), ("avg", "sincos2d")])
def test_forward_and_backward_reach_every_parameter(pool, position):
    torch.manual_seed(0)
    model = ViT(ViTConfig(TINY, image_size=8, patch_size=2, channels=3, num_classes=5, pool=pool, position=position))
    logits = model(torch.randn(4, 3, 8, 8))
    assert logits.shape == (4, 5) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    assert model(torch.randn(1, 3, 16, 16)).shape == (1, 5)  # another resolution: positions interpolated


def test_built_as_the_task_built_it_tower_then_head():
    """Same keys and the same draws from the RNG as the task's old `build()`, so seeded runs are unchanged."""
    cfg = ViTConfig(TINY, image_size=8, patch_size=2, channels=1, num_classes=10)
    torch.manual_seed(0)
    model = ViT(cfg)
    torch.manual_seed(0)
    tower = ImageTower(TINY, 8, 2, 1, "cls", "learned", False)
    head = nn.Linear(32, 10)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    expected = {**{f"tower.{k}": v for k, v in tower.state_dict().items()}, "head.weight": head.weight,
                "head.bias": head.bias}  # fmt: skip
    state = model.state_dict()
    assert list(state) == list(expected)
    for key, value in expected.items():
        torch.testing.assert_close(state[key], value, msg=key)
    assert model.cfg is cfg


def test_training_flops_are_the_towers_and_the_heads():
    model = ViT(ViTConfig(TINY, image_size=8, patch_size=2, channels=1, num_classes=10))
    images = torch.randn(3, 1, 8, 8)
    head = 6.0 * weight_count(model.head) * 3
    assert model.training_flops(images) == model.tower.training_flops(images) + head


@pytest.mark.parametrize(
    "change, key",
    [
        (dict(num_classes=0), "model.num_classes"),
        (dict(channels=0), "model.channels"),
        (dict(pool="max"), "model.pool"),
        (dict(position="rotary"), "model.position"),
    ],
)
def test_bad_configs_name_the_key(change, key):
    args = dict(backbone=TINY, image_size=8, patch_size=2, channels=1, num_classes=10)
    with pytest.raises(ValueError, match=key):
        ViTConfig(**{**args, **change})
