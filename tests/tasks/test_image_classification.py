"""ImageClassifier: shapes over image/patch sizes and channels, gradients, losses (label smoothing, Mixup/CutMix),
overfitting a batch, sizes from the data, validation outputs and media, checkpoints at another resolution."""

import math

import lightning as L
import numpy as np
import pytest
import torch

from polyformer.backbone import TransformerConfig
from polyformer.checkpointing.loading import load_task
from polyformer.data.digits import DIGIT_NAMES
from polyformer.data.images import AugmentConfig, ImageDataModule
from polyformer.data.info import DataInfo
from polyformer.models.image_tower import resize_pos_embed
from polyformer.models.vit import ViT
from polyformer.tasks.base import OptimizerConfig
from polyformer.tasks.image_classification import ImageClassifier, MixupConfig
from polyformer.tasks.media import AttentionOverlay, Heatmap, Images, MediaRequest

TINY = TransformerConfig(width=32, depth=2, heads=2, dropout=0.0)
# training_step called directly (no Trainer) logs into the void: Lightning warns, the loss is still what we test.
pytestmark = [
    pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`"),
    pytest.mark.usefixtures("one_thread"),
]


def build(**kwargs) -> ImageClassifier:
    args = dict(backbone=TINY, patch_size=2, num_classes=10, image_size=8, channels=1, mean=(0.5,), std=(0.5,))
    return ImageClassifier(**{**args, **kwargs})  # every size given: the model is built at once


def trainer(tmp_path, **kwargs) -> L.Trainer:
    args = dict(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=tmp_path, num_sanity_val_steps=0,
    )  # fmt: skip
    return L.Trainer(**{**args, **kwargs})


@pytest.mark.parametrize(
    "image_size, patch_size, channels, pool, position",
    [
        (8, 2, 1, "cls", "learned"),
        (32, 4, 3, "avg", "sincos2d"),
        (24, 8, 3, "cls", "sincos2d"),
        (12, 3, 4, "avg", "learned"),
    ],
)  # fmt: skip
def test_shapes_no_nan_and_every_parameter_gets_a_gradient(image_size, patch_size, channels, pool, position):
    task = build(image_size=image_size, patch_size=patch_size, channels=channels, pool=pool, position=position)
    images = torch.randn(3, channels, image_size, image_size)
    logits = task(images)
    assert logits.shape == (3, 10) and torch.isfinite(logits).all()
    logits.sum().backward()
    no_grad = [n for n, p in task.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


def test_small_head_starts_near_uniform_loss_and_label_smoothing_changes_the_loss():
    torch.manual_seed(0)  # the bound on the initial loss holds for typical draws, not every one
    task = build(label_smoothing=0.0)
    images, targets = torch.randn(4, 1, 8, 8), torch.arange(4)
    loss = task.training_step((images, targets), 0)
    assert abs(loss.item() - math.log(10)) < 0.1
    with torch.no_grad():
        torch.nn.init.normal_(task.model.head.weight, std=1.0)
    plain = task.training_step((images, targets), 0)
    task.label_smoothing = 0.1
    smoothed = task.training_step((images, targets), 0)
    logits = task(images)
    expected = 0.9 * torch.nn.functional.cross_entropy(logits, targets) - 0.1 * logits.log_softmax(-1).mean(-1).mean()
    torch.testing.assert_close(smoothed, expected)
    assert not torch.allclose(plain, smoothed)


def test_mixup_cutmix_trains_on_soft_targets_and_needs_an_even_batch():
    torch.manual_seed(0)
    task = build(mixup=MixupConfig(mixup_alpha=0.8, cutmix_alpha=1.0), label_smoothing=0.1)
    images, targets = torch.randn(4, 1, 8, 8), torch.arange(4)
    with torch.no_grad():
        task.model.head.weight.zero_()  # uniform prediction: the loss is ln K whatever the soft targets
    torch.testing.assert_close(task.training_step((images, targets), 0), torch.tensor(math.log(10)))
    with torch.no_grad():
        torch.nn.init.normal_(task.model.head.weight, std=1.0)
    np.random.seed(1)  # timm draws lambda and the Mixup/CutMix switch from numpy
    loss = task.training_step((images.clone(), targets), 0)
    np.random.seed(1)
    mixed, soft = task.mixup(images.clone(), targets)
    assert not torch.equal(mixed, images) and soft.shape == (4, 10)
    torch.testing.assert_close(soft.sum(-1), torch.ones(4))
    assert soft.min() > 0  # label smoothing reaches every class
    assert (soft > 0.5 * 0.1 / 10).sum(-1).max() <= 2 + 8  # two mixed labels dominate
    torch.testing.assert_close(loss, -(soft * task(mixed).log_softmax(-1)).sum(-1).mean())
    with pytest.raises(ValueError, match="batch size must be even, got 3"):
        task.training_step((torch.randn(3, 1, 8, 8), torch.arange(3)), 0)
    with pytest.raises(ValueError, match="not both 0"):
        MixupConfig(mixup_alpha=0.0, cutmix_alpha=0.0)


def test_a_tiny_model_overfits_a_tiny_batch():
    torch.manual_seed(0)
    task = build(label_smoothing=0.0)
    images, targets = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    opt = torch.optim.AdamW(task.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        task.training_step((images, targets), 0).backward()
        opt.step()
    assert (task(images).argmax(-1) == targets).all()


def test_validation_exposes_metrics_confusion_matrix_and_misclassified_images(tmp_path):
    torch.manual_seed(0)
    task = ImageClassifier(backbone=TINY, patch_size=2, optimizer=OptimizerConfig(lr=3e-3, warmup_steps=5))
    data = ImageDataModule(batch_size=64, augment=AugmentConfig(crop_scale=(1.0, 1.0), hflip=0.0))
    t = trainer(tmp_path, max_steps=20, limit_val_batches=1.0, enable_checkpointing=False)
    t.fit(task, data)
    assert (task.num_classes, task.channels, task.class_names) == (10, 1, DIGIT_NAMES)  # linked from the data
    metrics = t.callback_metrics
    assert 0.0 <= metrics["val/top1"] <= metrics["val/top5"] <= 1.0
    cm = task.confusion_matrix
    assert cm.shape == (10, 10) and cm.sum() == 180  # every validation image counted once
    assert abs(cm.diag().sum() / 180 - metrics["val/top1"]) < 1e-6
    assert 0 < len(task.misclassified) <= 16
    for item in task.misclassified:
        assert item.image.shape == (1, 8, 8) and item.image.dtype == torch.uint8
        assert item.target != item.predicted and 0 < item.confidence <= 1

    # What the media callback logs: the confusion matrix and the first misclassified images, captioned.
    batch = next(iter(data.val_dataloader()))
    # + the attention overlay item, which the media callback draws from recorded attention (tested there)
    heat, shots, overlay = task.media((batch[0][:4], batch[1][:4]), MediaRequest(num_samples=3))
    assert isinstance(overlay, AttentionOverlay) and overlay.key == "attention_overlay"
    assert isinstance(heat, Heatmap) and heat.key == "confusion_matrix" and torch.equal(heat.matrix, cm)
    assert heat.xlabels == heat.ylabels == DIGIT_NAMES and (heat.xlabel, heat.ylabel) == ("predicted", "true")
    assert heat.annotate  # 10 classes: each cell's count is written
    assert isinstance(shots, Images) and shots.key == "misclassified"
    assert len(shots.images) == len(shots.captions) == min(3, len(task.misclassified))
    first = task.misclassified[0]
    assert torch.equal(shots.images[0], first.image)
    assert shots.captions[0] == (
        f"true {DIGIT_NAMES[first.target]} / predicted {DIGIT_NAMES[first.predicted]} ({first.confidence:.2f})"
    )
    (test,) = t.test(task, data, verbose=False)
    assert set(test) == {"test/loss", "test/top1", "test/top5"}


def test_sizes_and_class_names_come_from_the_data_info():
    task = ImageClassifier(backbone=TINY, patch_size=2)
    assert task.model is None and task.missing_sizes() == ["num_classes", "image_size", "channels"]
    with pytest.raises(ValueError, match="--model.num_classes, --model.image_size, --model.channels"):
        task.configure_model()  # no Trainer, no data: the error names the flags to set
    info = DataInfo(num_classes=3, class_names=("a", "b", "c"), image_size=8, channels=1, mean=(0.5,), std=(0.2,))
    task.connect_data(info)
    task.configure_model()
    assert isinstance(task.model, ViT) and task.model.cfg.num_classes == 3
    # Stored as hyperparameters, so a checkpoint is enough for `polyformer classify`.
    hp = task.hparams
    assert (hp["num_classes"], hp["class_names"], hp["mean"], hp["std"]) == (3, ["a", "b", "c"], (0.5,), (0.2,))
    assert all(k.startswith("model.") for k in task.state_dict())  # checkpoint format 3
    assert task(torch.randn(2, 1, 8, 8)).shape == (2, 3)

    given = ImageClassifier(backbone=TINY, patch_size=2, num_classes=4, class_names=["x", "y", "z", "w"])
    given.connect_data(info)  # the config's own values win over the data's
    assert (given.num_classes, given.class_names, given.image_size) == (4, ["x", "y", "z", "w"], 8)
    with pytest.raises(ValueError, match="2 class_names given for num_classes=3"):
        build(num_classes=3, class_names=["x", "y"])


def test_checkpoint_loads_at_another_resolution_with_interpolated_positions(tmp_path):
    torch.manual_seed(0)
    task = ImageClassifier(backbone=TINY, patch_size=2, optimizer=OptimizerConfig(lr=3e-3, warmup_steps=5))
    t = trainer(tmp_path, max_steps=5, limit_val_batches=1, enable_checkpointing=False)
    t.fit(task, ImageDataModule(batch_size=64))
    path = tmp_path / "digits.ckpt"
    t.save_checkpoint(path)

    # Safe reload (weights_only), same resolution: the same logits.
    images = torch.randn(2, 1, 8, 8)
    loaded = load_task(path, expected=ImageClassifier)
    assert loaded.class_names == DIGIT_NAMES
    torch.testing.assert_close(loaded(images), task.eval()(images))
    # The rebuilt model runs at 16x16 too (positions interpolated on the fly).
    assert loaded(torch.randn(2, 1, 16, 16)).shape == (2, 10)

    # Lightning at 16x16: the checkpoint's 4x4 position grid is resized to 8x8 when it is loaded.
    bigger = ImageClassifier(backbone=TINY, patch_size=2, image_size=16)
    data = ImageDataModule(batch_size=64, image_size=16)
    (result,) = trainer(tmp_path, limit_val_batches=2).validate(bigger, data, ckpt_path=path, verbose=False)
    expected = resize_pos_embed(task.model.tower.pos_embed.detach(), 8, prefix_tokens=1)
    torch.testing.assert_close(bigger.model.tower.pos_embed.detach(), expected)
    torch.testing.assert_close(bigger.model.tower.patch.proj.weight, task.model.tower.patch.proj.weight)
    assert math.isfinite(result["val/loss"])

    with pytest.raises(ValueError, match="backbone.width"):
        wider = ImageClassifier(backbone=TransformerConfig(width=64, depth=2, heads=2, dropout=0.0), patch_size=2)
        trainer(tmp_path, limit_val_batches=1).validate(wider, ImageDataModule(batch_size=64), ckpt_path=path)
