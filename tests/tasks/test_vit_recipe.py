"""DeiT III pieces in the ViT task: binary cross-entropy (loss="bce") against its formula, on Mixup/CutMix's mixed
targets and on plain (smoothed) labels; LayerScale through the backbone config; the ce path unchanged."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from polyformer.backbone import TransformerConfig
from polyformer.tasks.image_classification import ImageClassifier, MixupConfig

pytestmark = [
    pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`"),
    pytest.mark.usefixtures("one_thread"),
]


def build(**kwargs) -> ImageClassifier:
    torch.manual_seed(0)
    backbone = kwargs.pop("backbone", TransformerConfig(width=32, depth=2, heads=2, dropout=0.0))
    args = dict(backbone=backbone, patch_size=2, num_classes=4, image_size=8, channels=1, mean=(0.5,), std=(0.5,))
    return ImageClassifier(**{**args, **kwargs})


def bce_by_hand(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    total = 0.0
    for z, y in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = 1 / (1 + math.exp(-z))
        total += -(y * math.log(p) + (1 - y) * math.log(1 - p))
    return torch.tensor(total / logits.numel())  # mean over the B x K entries


def test_bce_with_mixup_targets_equals_the_formula():
    task = build(loss="bce", label_smoothing=0.0, mixup=MixupConfig(mixup_alpha=0.8, cutmix_alpha=0.0))
    images, labels = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    np.random.seed(0)  # timm's Mixup draws lambda from numpy, and mixes the batch in place
    loss = task.training_step((images.clone(), labels), 0)
    np.random.seed(0)
    mixed, soft = task.mixup(images.clone(), labels)
    lam = float(soft[0, 0])  # batch mode: x_i = lam x_i + (1 - lam) x_flip(i), targets likewise
    one_hot = F.one_hot(labels, 4).float()
    torch.testing.assert_close(soft, lam * one_hot + (1 - lam) * one_hot.flip(0))
    torch.testing.assert_close(mixed, lam * images + (1 - lam) * images.flip(0))
    with torch.no_grad():
        expected = bce_by_hand(task.model(mixed), soft)
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


def test_bce_without_mixup_uses_smoothed_one_hot_targets():
    task = build(loss="bce", label_smoothing=0.1)
    images, labels = torch.randn(3, 1, 8, 8), torch.tensor([2, 0, 3])
    loss = task.training_step((images, labels), 0)
    targets = torch.full((3, 4), 0.1 / 4)
    targets[torch.arange(3), labels] = 1 - 0.1 + 0.1 / 4
    with torch.no_grad():
        torch.testing.assert_close(loss.detach(), bce_by_hand(task.model(images), targets), rtol=1e-5, atol=1e-6)


def test_ce_path_unchanged_and_bad_loss_fails():
    task = build()
    images, labels = torch.randn(3, 1, 8, 8), torch.tensor([2, 0, 3])
    with torch.no_grad():
        expected = F.cross_entropy(task.model(images), labels, label_smoothing=0.1)
    torch.testing.assert_close(task.training_step((images, labels), 0).detach(), expected)
    with pytest.raises(ValueError, match="model.loss"):
        build(loss="focal")


def test_layer_scale_reaches_the_vit_and_gets_gradients():
    task = build(backbone=TransformerConfig(width=32, depth=2, heads=2, dropout=0.0, layer_scale=0.1), loss="bce")
    task.training_step((torch.randn(2, 1, 8, 8), torch.tensor([0, 1])), 0).backward()
    gammas = {n: p for n, p in task.model.named_parameters() if n.endswith("gamma")}
    assert len(gammas) == 4 and all(p.grad.abs().max() > 0 for p in gammas.values())
    torch.testing.assert_close(gammas["tower.encoder.blocks.0.ls1.gamma"].detach(), torch.full((32,), 0.1))
