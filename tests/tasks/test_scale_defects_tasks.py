"""Regression tests for defects found when scaling the task recipes up: CLIP's logit scale stuck at its cap, the
CIFAR-10 preset selecting its checkpoint on the test set, and the Mixup/CutMix loss computed in bf16 under autocast."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from polyformer.backbone import TransformerConfig
from polyformer.data.digits import DIGIT_NAMES, load_digits_split
from polyformer.data.image_text import ImageTextData
from polyformer.data.images import AugmentConfig, ImageDataModule
from polyformer.tasks.base import OptimizerConfig
from polyformer.tasks.contrastive import CLIP, ImageEncoderConfig, TextEncoderConfig
from polyformer.tasks.image_classification import ImageClassifier, MixupConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
# training_step called directly (no Trainer) logs into the void: Lightning warns, the loss is still what we test.
pytestmark = [
    pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`"),
    pytest.mark.usefixtures("one_thread"),
]


# ---- 1. CLIP's logit scale must be able to come back down from its cap ------------------------------------------
def small_clip(**kw) -> CLIP:
    torch.manual_seed(0)
    image = ImageEncoderConfig(TransformerConfig(width=32, depth=1, heads=2, dropout=0.0, position="none"), 8, 2, 1)
    text = TextEncoderConfig(
        TransformerConfig(width=32, depth=1, heads=2, dropout=0.0, position="learned", max_len=32, causal=True)
    )
    return CLIP(image=image, text=text, embed_dim=32, **kw)


def test_clip_logit_scale_above_the_cap_still_gets_a_gradient():
    data = ImageTextData(batch_size=8, context_length=32)
    data.setup("fit")
    model = small_clip(vocab_size=data.vocab_size, eos_id=data.eos_id)
    cap = math.log(model.max_logit_scale)
    with torch.no_grad():
        model.model.logit_scale.fill_(cap + 1.0)  # e.g. a large learning rate pushed it past the cap
    batch = next(iter(data.train_dataloader()))
    model.training_step(batch, 0).backward()
    # A clamp inside the forward pass gives exactly 0 here, and the parameter could never move again.
    assert model.model.logit_scale.grad is not None and model.model.logit_scale.grad.abs().item() > 0
    # Evaluation and `score` still never use a scale beyond the cap (say, from an old checkpoint).
    assert model.model.scale().item() == pytest.approx(model.max_logit_scale)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_clip_logit_scale_is_clamped_in_place_after_every_optimizer_step(tmp_path, accumulate):
    L.seed_everything(0)
    model = small_clip(max_logit_scale=20.0, optimizer=OptimizerConfig(lr=1e-3, warmup_steps=0))
    cap = math.log(model.max_logit_scale)
    seen: list[float] = []

    class PushUp(L.Callback):
        """Puts the parameter above the cap just before each optimizer step (after backward), as a step that
        overshoots would: whatever the optimizer then does, the clamp must come after it."""

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            with torch.no_grad():
                pl_module.model.logit_scale.fill_(cap + 1.0)

    class Record(L.Callback):
        # Callbacks' on_train_batch_end run before the module's: a checkpoint saved there must already be clamped.
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if (batch_idx + 1) % accumulate == 0:
                seen.append(pl_module.model.logit_scale.item())

    trainer = L.Trainer(
        max_steps=3, accumulate_grad_batches=accumulate, limit_val_batches=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
        callbacks=[PushUp(), Record()],
    )  # fmt: skip
    trainer.fit(model, ImageTextData(batch_size=16, context_length=32))
    assert len(seen) == 3
    assert all(v <= cap + 1e-6 for v in seen), (seen, cap)  # including the last step's
    assert model.model.logit_scale.item() <= cap + 1e-6


# ---- 2. the CIFAR-10 preset selects its checkpoint on a held-out validation split ------------------------------
class FakeCIFAR:
    """A stand-in for torchvision's CIFAR10 (not available offline): digits images, `classes` and `targets`."""

    def __init__(self, train: bool, n: int) -> None:
        self.images, _ = load_digits_split("train" if train else "test")
        self.classes = list(DIGIT_NAMES)
        self.targets = [i % 10 for i in range(n)]  # balanced like CIFAR-10: 5,000 training images per class

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index % len(self.images)], self.targets[index]


def fake_cifar(monkeypatch, n_train: int = 50_000, n_test: int = 10_000) -> dict[bool, FakeCIFAR]:
    made = {True: FakeCIFAR(True, n_train), False: FakeCIFAR(False, n_test)}
    monkeypatch.setattr(ImageDataModule, "_cifar", lambda self, train: made[train])
    return made


def cifar10_preset() -> dict:
    return yaml.safe_load((CONFIGS / "vit" / "cifar10.yaml").read_text())


def preset_data_module() -> ImageDataModule:
    args = dict(cifar10_preset()["data"]["init_args"])
    args["augment"] = AugmentConfig(**args["augment"])
    args["num_workers"] = 0
    return ImageDataModule(**args)


def test_cifar10_preset_holds_out_a_stratified_validation_split_and_monitors_it(monkeypatch):
    preset = cifar10_preset()
    monitors = [c["init_args"].get("monitor") for c in preset["trainer"]["callbacks"] if "init_args" in c]
    assert "val/top1" in monitors
    assert preset["data"]["init_args"]["val_fraction"] == pytest.approx(0.1)

    made = fake_cifar(monkeypatch)
    dm = preset_data_module()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "validation is the test split" warning here
        dm.setup("fit")
    train, val, test = (dm.splits[s].base for s in ("train", "val", "test"))
    assert len(val) == 5_000 and len(train) == 45_000 and test is made[False]
    # The validation images come from the training set, never from the test set, and are not trained on.
    assert val.dataset is made[True] and train.dataset is made[True]
    assert set(val.indices).isdisjoint(train.indices)
    counts = np.bincount([made[True].targets[i] for i in val.indices], minlength=10)
    assert (counts == 500).all()  # stratified: 10% of every class
    # Seeded: the same split every time.
    again = preset_data_module()
    again.setup("fit")
    assert again.splits["val"].base.indices == val.indices


def test_validation_on_the_test_split_warns_once_and_names_the_monitored_metric(monkeypatch, tmp_path):
    made = fake_cifar(monkeypatch, n_train=200, n_test=50)
    dm = ImageDataModule("cifar10", val_fraction=0.0, batch_size=8)
    trainer = L.Trainer(
        logger=False, enable_progress_bar=False, default_root_dir=tmp_path,
        callbacks=[L.pytorch.callbacks.ModelCheckpoint(monitor="val/top1", mode="max")],
    )  # fmt: skip
    dm.trainer = trainer
    with pytest.warns(UserWarning, match="validation split is the test split") as record:
        dm.setup("fit")
        dm.setup("test")  # a second stage must not repeat it
    relevant = [w for w in record if "validation split is the test split" in str(w.message)]
    assert len(relevant) == 1 and "val/top1" in str(relevant[0].message)
    assert dm.splits["val"].base is dm.splits["test"].base is made[False]

    # val_fraction > 0: held out from train, disjoint from test, and no warning.
    dm = ImageDataModule("cifar10", val_fraction=0.1, batch_size=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        dm.setup("fit")
    val, test = dm.splits["val"].base, dm.splits["test"].base
    assert val.dataset is made[True] and test is made[False] and len(val) == 20


def test_digits_have_their_own_validation_split_whatever_val_fraction():
    for fraction in (0.0, 0.1):
        dm = ImageDataModule("digits", val_fraction=fraction)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            dm.setup("fit")
        val, test = dm.splits["val"].base, dm.splits["test"].base
        assert val is not test and len(val) == 180 and len(test) == 360


# ---- 3. the Mixup/CutMix soft-target loss is computed in fp32 ---------------------------------------------------
def test_mixup_loss_is_fp32_under_cpu_bf16_autocast():
    torch.manual_seed(0)
    task = ImageClassifier(
        backbone=TransformerConfig(width=32, depth=2, heads=2, dropout=0.0), patch_size=2, num_classes=10,
        image_size=8, channels=1, mean=(0.5,), std=(0.5,), mixup=MixupConfig(), label_smoothing=0.1,
    )  # fmt: skip
    with torch.no_grad():
        torch.nn.init.normal_(task.model.head.weight, std=1.0)  # logits of a few units: bf16 rounds them visibly
    seen: dict[str, torch.Tensor] = {}
    mix = task.mixup

    def record_mixup(images, targets):
        seen["images"], seen["soft"] = mix(images, targets)
        return seen["images"], seen["soft"]

    task.mixup = record_mixup
    task.model.head.register_forward_hook(lambda module, args, out: seen.__setitem__("logits", out))
    np.random.seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = task.training_step((torch.randn(8, 1, 8, 8), torch.arange(8) % 10), 0)
    assert seen["logits"].dtype == torch.bfloat16  # the model did run in bf16
    expected = torch.sum(-seen["soft"].float() * F.log_softmax(seen["logits"].float(), dim=-1), dim=-1).mean()
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=0)
